"""One GPU acceptance run, one markdown report: `make gpu-check` on one H100/H200 (about 5-8 minutes).

Steps (each a subprocess, so one failure is reported and the others still run):
  1. kernel: benchmarks/sinkhorn_margin.py on its GPU sizes; the Triton kernel and the torch reference are
     both compared with float64 (max relative error; the kernel must stay <= 1e-5), then its table;
  2. rm:     benchmarks/rm_throughput.py at the 1.03B Llama shape, bt and aplot in one run;
  3. ppo:    two PPO iterations with the HF rollout backend on a small random Llama (benchmarks/ppo_step.py);
  4. offload: a ZeRO-3 PPO trainer's DeepSpeed offload_states / reload_states around a rollout (a separate
     HF copy of the policy generates while the states are off the GPU), GPU memory freed and restored, then
     one more PPO iteration to show training resumes.
Writes benchmarks/results/gpu_check/report.md (card, driver, versions, every step's output); exit 1 if a
step failed. `--cpu-smoke` runs the same steps at tiny sizes on CPU (the kernel under TRITON_INTERPRET=1).

  python benchmarks/gpu_check.py                  # GPU
  python benchmarks/gpu_check.py --cpu-smoke      # CPU, to prove the logic
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_RTOL = 1e-5


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def run_step(name, cmd, timeout, env=None):
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + ("\n" + proc.stderr[-4000:] if proc.returncode else "")
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"timed out after {timeout} s\n{(exc.stdout or b'')[-4000:]!r}"
    sec = time.perf_counter() - t0
    print(f"[{name}] rc={rc} in {sec:.0f} s", flush=True)
    return {"name": name, "cmd": " ".join(cmd), "rc": rc, "seconds": round(sec, 1), "output": out}


def versions():
    """Card, driver and package versions, read without importing CUDA in this process."""
    code = ("import json, platform, torch\n"
            "v = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda}\n"
            "for m in ('triton', 'transformers', 'deepspeed', 'ot', 'vllm'):\n"
            "    try:\n        v[m] = __import__(m).__version__\n    except Exception as e:\n"
            "        v[m] = 'not installed' if isinstance(e, ImportError) else type(e).__name__\n"
            "v['card'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (CPU)'\n"
            "print(json.dumps(v))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    v = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-500:]}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        v["nvidia-smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired):
        v["nvidia-smi"] = "not available"
    v["host"] = f"{platform.node()}, {os.cpu_count()} CPU cores"
    return v


def kernel_verdict(jsonl):
    """Kernel and reference max relative errors vs float64 per size; failures where the kernel exceeds 1e-5."""
    lines, bad = [], []
    for rec in map(json.loads, open(jsonl)):
        k, e = rec["methods"].get("kernel", {}), rec["methods"].get("eager", {})
        size = f"G={rec['G']} B={rec['B']} d={rec['d']}"
        if "max_rel_err" not in k:
            bad.append(f"{size}: kernel did not run ({k.get('error', 'missing')})")
            continue
        lines.append(f"| {size} | {k.get('path', '?')} | {k['max_rel_err']:.2e} "
                     f"| {e.get('max_rel_err', float('nan')):.2e} |")
        if not (k["max_rel_err"] <= KERNEL_RTOL and k.get("finite", False)):
            bad.append(f"{size}: kernel max relative error {k['max_rel_err']:.2e} > {KERNEL_RTOL:g}")
    table = ["| size | kernel path | kernel vs float64 | torch reference vs float64 |", "|---|---|---|---|"] + lines
    return "\n".join(table), bad


OFFLOAD_CODE = r"""
import json, os, sys, tempfile, torch
sys.path.insert(0, os.path.join({root!r}, "benchmarks"))
from ppo_step import build_policy
from aplot_rlhf.engine import deepspeed as ds_api
from aplot_rlhf.engine import distributed as comm
from aplot_rlhf.config import PPOConfig
from aplot_rlhf.trainers.ppo import PPOTrainer
from transformers import AutoModelForCausalLM
ds_api.init_distributed("auto", 600)
folder = tempfile.mkdtemp(prefix="gpu_check_offload_")
build_policy({shape!r}, folder)
# loaded before the trainer: once ZeRO-3 is set up, from_pretrained would partition this copy too
gen = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
cfg = PPOConfig(actor_model=folder, reward_model="rule:neg_length", prompt_data=[os.path.join(folder, "prompts.jsonl")],
                prompt_format="text", eval_prompts=0, rollout_backend="hf", rollout_batch_size={prompts},
                ppo_mini_batch_size={prompts}, micro_batch_size={prompts}, max_new_tokens={new_tokens},
                max_prompt_length=64, ppo_iterations=3, zero_stage=3, output_dir=os.path.join(folder, "run"),
                tensorboard=False, progress=False, export=False, learning_rate=1e-6, temperature=1.0).validate()
trainer = PPOTrainer(cfg).setup()
trainer.step()
cuda = torch.cuda.is_available()
mem = lambda: torch.cuda.memory_allocated() if cuda else 0
if cuda:
    torch.cuda.synchronize()
before = mem()
# DeepSpeed offloads only FusedAdam states (the optimizer "auto" picks on CUDA): on CPU the calls are skipped
if cuda:
    ds_api.offload_states(trainer.actor, trainer.critic)
if cuda:
    torch.cuda.synchronize()
offloaded = mem()
# the rollout while the training states are away: a separate copy of the policy generates
gen = gen.to(comm.device())
prompt = torch.randint(10, 1000, (2, 16), device=comm.device())
out = gen.generate(prompt, max_new_tokens={new_tokens}, do_sample=True, pad_token_id=2)
during = mem()
del gen
if cuda:
    torch.cuda.empty_cache()
    ds_api.reload_states(trainer.actor, trainer.critic)
if cuda:
    torch.cuda.synchronize()
reloaded = mem()
after_step = trainer.step()
print("OFFLOAD " + json.dumps(dict(device=str(comm.device()), offload_called=cuda, before=before, offloaded=offloaded,
                                  during_rollout=during, reloaded=reloaded,
                                  generated=int(out.shape[1] - prompt.shape[1]),
                                  step_after_reload={{k: after_step[k] for k in ("gen_s", "train_s")
                                                     if k in after_step}})))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="the same steps at tiny sizes on CPU")
    p.add_argument("--out_dir", default="", help="report folder (default: benchmarks/results/gpu_check, or a "
                   "temporary folder with --cpu-smoke: smoke numbers are not results)")
    p.add_argument("--steps", default="kernel,rm,ppo,offload")
    args = p.parse_args(argv)
    from machine import print_machine_header  # benchmarks/machine.py
    print_machine_header()
    smoke = args.cpu_smoke
    out_dir = args.out_dir or (os.path.join(tempfile.gettempdir(), "gpu_check_smoke") if smoke
                               else os.path.join(ROOT, "benchmarks", "results", "gpu_check"))
    os.makedirs(out_dir, exist_ok=True)
    want = set(args.steps.split(","))
    py = sys.executable
    results = []
    t_start = time.perf_counter()
    info = versions()
    if not smoke and "none" in str(info.get("card", "none")):
        sys.exit("gpu_check: no CUDA device; pass --cpu-smoke for the CPU version")
    if "kernel" in want:
        jsonl = os.path.join(out_dir, "sinkhorn_margin.jsonl")
        if os.path.exists(jsonl):
            os.remove(jsonl)
        cmd = [py, "benchmarks/sinkhorn_margin.py", "--out", jsonl]
        env = None
        if smoke:  # interpreted kernel: small sizes, no torch.compile (minutes of compile on 2 cores)
            cmd += ["--cpu-smoke", "--sizes", "2,16,32;1,40,24", "--methods", "kernel,eager", "--iters", "10",
                    "--budget-s", "0.05"]
            env = {"TRITON_INTERPRET": "1"}
        r = run_step("kernel", cmd, 900 if smoke else 240, env)
        if r["rc"] == 0:
            r["table"], bad = kernel_verdict(jsonl)
            if bad:
                r["rc"], r["verdict"] = 1, "; ".join(bad)
        results.append(r)
    if "rm" in want:
        cmd = [py, "benchmarks/rm_throughput.py", "--losses", "bt,aplot"]
        cmd += ["--preset", "cpu-tiny", "--steps", "1", "--warmup", "1"] if smoke else \
            ["--preset", "llama-1b", "--steps", "5", "--warmup", "2"]
        results.append(run_step("rm", cmd, 900 if smoke else 180))
    if "ppo" in want:
        cmd = [py, "benchmarks/ppo_step.py", "--step_backend", "hf", "--backends", "hf_gathered", "--iterations", "2"]
        cmd += ["--preset", "tiny", "--prompts", "2", "--new_tokens", "8"] if smoke else \
            ["--preset", "smollm2-135m", "--prompts", "16", "--new_tokens", "64"]
        results.append(run_step("ppo", cmd, 900 if smoke else 150))
    if "offload" in want:
        code = OFFLOAD_CODE.format(root=ROOT, shape="tiny" if smoke else "smollm2-135m", prompts=2 if smoke else 8,
                                   new_tokens=8 if smoke else 64)
        r = run_step("offload", [py, "-c", code], 900 if smoke else 150)
        line = next((ln for ln in r["output"].splitlines() if ln.startswith("OFFLOAD ")), None)
        if r["rc"] == 0 and line:
            m = json.loads(line[len("OFFLOAD "):])
            mib = lambda b: f"{b / 2 ** 20:.1f} MiB"  # noqa: E731
            r["table"] = ("| allocated before offload | after offload_states | during the rollout "
                          "| after reload_states |\n"
                          f"|---|---|---|---|\n| {mib(m['before'])} | {mib(m['offloaded'])} "
                          f"| {mib(m['during_rollout'])} | {mib(m['reloaded'])} |\n\n"
                          f"freed {mib(m['before'] - m['offloaded'])}, restored "
                          f"{mib(m['reloaded'] - m['offloaded'])}; {m['generated']} tokens generated while offloaded; "
                          f"one PPO iteration after reload: {m['step_after_reload']}"
                          + ("" if m["offload_called"] else "\n\nCPU: offload_states/reload_states not called "
                             "(DeepSpeed offloads only FusedAdam, a CUDA optimizer); memory not measured"))
            restored = m["offloaded"] < m["before"] and m["reloaded"] >= 0.95 * m["before"]
            if m["device"].startswith("cuda") and not restored:
                r["rc"], r["verdict"] = 1, "offload_states freed nothing or reload_states did not restore the states"
        elif r["rc"] == 0:
            r["rc"], r["verdict"] = 1, "no OFFLOAD line in the output"
        results.append(r)
    total = time.perf_counter() - t_start
    report = os.path.join(out_dir, "report.md")
    with open(report + ".tmp", "w") as f:
        f.write(f"# gpu_check {'(CPU smoke: tiny sizes, not GPU numbers)' if smoke else ''}\n\n")
        f.write(f"{datetime.datetime.now().isoformat(timespec='seconds')}, total {total:.0f} s\n\n")
        f.write("| what | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in info.items()) + "\n")
        for r in results:
            f.write(f"## {r['name']}: {'PASS' if r['rc'] == 0 else 'FAIL'} ({r['seconds']} s)\n\n`{r['cmd']}`\n\n")
            if r.get("verdict"):
                f.write(f"**{r['verdict']}**\n\n")
            if r.get("table"):
                f.write(r["table"] + "\n\n")
            f.write("```\n" + r["output"][-6000:].strip() + "\n```\n\n")
    os.replace(report + ".tmp", report)
    failed = [r["name"] for r in results if r["rc"] != 0]
    print(f"report: {report} ({total:.0f} s); {'FAIL: ' + ', '.join(failed) if failed else 'all steps passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
