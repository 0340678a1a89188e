#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite offline; prints the slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
python -m ruff check cl strategies scenarios tests benchmarks
python -m pytest -q -p no:cacheprovider --durations=25 "$@"
