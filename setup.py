# Every setting is in pyproject.toml. This file is kept only because aplot_rlhf/cli/demo.py and demo_ppo.py
# recognise a source checkout by it (they then write runs/ beside the repository, not in the working directory).
from setuptools import setup

setup()
