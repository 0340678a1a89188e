#!/usr/bin/env bash
# Install cl and what its tests need into the current Python, on a fresh machine.
# Fashion-MNIST comes from the Debian package dataset-fashion-mnist (no download at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); its tests will be skipped" >&2
  fi
fi
python -m pip install -q -e ".[test]"
