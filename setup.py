"""Package layout that pyproject.toml cannot express: ``configs/`` and ``assets/`` ship inside the wheel as
``cl/_presets/configs`` and ``cl/_presets/assets`` (same relative layout, so a preset's ``../../assets/...`` path
still resolves), which is what lets ``cl train config=slca/cpu`` run from any folder after ``pip install``."""

from setuptools import find_namespace_packages, setup

setup(
    # namespace packages too: data folders without __init__.py (scenarios/splits) are package data
    packages=find_namespace_packages(include=["cl*", "strategies*", "scenarios*"], exclude=["*__pycache__*"])
    + ["cl._presets.configs", "cl._presets.assets"],
    package_dir={"cl._presets.configs": "configs", "cl._presets.assets": "assets"},
    package_data={"": ["*.yaml", "*.json"], "cl._presets.configs": ["**/*.yaml"],
                  "cl._presets.assets": ["**/*.pt", "**/*.json"]},
)
