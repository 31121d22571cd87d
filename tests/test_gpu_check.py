"""`make gpu-check`'s logic on CPU: the same four steps (kernel vs reference vs float64, RM throughput,
two HF-rollout PPO iterations, a rollout between ZeRO-3 offload and reload) at tiny sizes, one report.
On CPU the offload/reload calls themselves are skipped (DeepSpeed offloads only its CUDA optimizer), so
the GPU memory numbers exist only on a GPU."""
import subprocess

import pytest

from helpers import PYTHON, REPO, python_env

pytestmark = pytest.mark.slow


def test_gpu_check_cpu_smoke_runs_every_step_and_writes_the_report(tmp_path):
    proc = subprocess.run([PYTHON, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke",
                           "--out_dir", str(tmp_path)], env=python_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all steps passed" in proc.stdout + proc.stderr
    report = (tmp_path / "report.md").read_text()
    for step in ("kernel", "rm", "ppo", "offload"):
        assert f"## {step}: PASS" in report, (step, report[:2000])
