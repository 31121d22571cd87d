"""The one-process speed paths (issue 14) give torch's own AdamW step: fused AdamW through DeepSpeed's
torch_adam path, and ZeRO-0 on one rank without DeepSpeed's gradient all-reduce. Real DeepSpeed, one process."""
import json
import subprocess

from helpers import PYTHON, REPO, free_port, python_env

SCRIPT = r"""
import copy, json, os, sys
import torch
from aplot_rlhf.engine import deepspeed as ds_api
from aplot_rlhf.config import RMConfig
os.environ["MASTER_PORT"] = sys.argv[1]
ds_api.init_distributed("gloo", 60)
out = {}
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
x = torch.randint(0, 50, (6, 4, 5))
def loss_of(m, xb):
    return (m(xb).squeeze(-1).mean(-1) ** 2).mean() + m(xb).sum() * 0.01
cfg = RMConfig(model_name_or_path="x", train_data=["x"], precision="fp32", micro_batch_size=4,
               learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="linear", min_lr_ratio=0.0,
               adam_betas=[0.9, 0.999], max_grad_norm=0.05)
# the reference: plain torch, what HF's Trainer does (fused AdamW, clip_grad_norm_, LambdaLR)
ref = copy.deepcopy(base)
decay = [p for n, p in ref.named_parameters() if p.ndim >= 2 and "norm" not in n]
nodecay = [p for n, p in ref.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": nodecay, "weight_decay": 0.0}],
                        lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=True)
sched = torch.optim.lr_scheduler.LambdaLR(opt, ds_api.lr_lambda(6, 0, "linear", 0.0))
for xb in x:
    opt.zero_grad()
    loss_of(ref, xb).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    opt.step(); sched.step()
for stage in (0, 2):
    cfg.zero_stage = stage
    ds = ds_api.build_ds_config(cfg, 1)
    engine, _ = ds_api.initialize(copy.deepcopy(base), ds, cfg, 6)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for xb in x:
        engine.backward(loss_of(engine.module, xb)); engine.step()
    diff = max((a - b).abs().max().item() for a, b in zip(engine.module.parameters(), ref.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(base.parameters(), ref.parameters()))
    out[stage] = {"fused": inner.defaults.get("fused"), "allreduce": engine.enable_backward_allreduce,
                  "diff": diff, "moved": moved}
print("RESULT " + json.dumps(out))
"""


def test_one_process_fused_adamw_without_allreduce_matches_torch():
    proc = subprocess.run([PYTHON, "-c", SCRIPT, str(free_port())], env=python_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for stage in ("0", "2"):
        r = res[stage]
        assert r["fused"] is True, r  # torch's one-kernel AdamW, as HF's Trainer uses on CPU
        assert r["moved"] > 1e-3, r  # the steps did change the weights
        assert r["diff"] < 1e-5, r  # and exactly as plain torch does
    assert res["0"]["allreduce"] is False  # one rank: no flatten / all-reduce / copy-back of every gradient
