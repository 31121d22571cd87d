"""The thin setuptools entry point: every setting is in pyproject.toml (metadata, dependencies, version).

Kept for tools and habits that look for setup.py; `pip install -e .`, `pip install .` and `python -m build`
read pyproject.toml either way.
"""
from setuptools import setup

setup()
