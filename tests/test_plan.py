"""Tests of the memory planner: exact parameter counts, agreement with DeepSpeed's own ZeRO estimators,
the activation formula against peak memory measured on CPU at tiny sizes, verdicts, suggestions and the CLI.

Not covered here: GPU peak memory (CUDA context, NCCL buffers, flash-attention kernels, vLLM); the reserve
constants in aplot_rlhf/plan/memory.py are stated assumptions until a GPU run checks them.
Run `python tests/test_plan.py` to print the activation check as a markdown table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch

from aplot_rlhf import plan as P
from aplot_rlhf.cli import plan as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------------------ shapes


def test_builtin_param_counts_match_published_totals():
    published = {  # safetensors totals of the hub checkpoints (causal LM)
        "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496, "qwen2.5-7b": 7_615_616_512,
        "qwen2.5-14b": 14_770_033_664, "qwen2.5-72b": 72_706_203_648, "mistral-7b": 7_241_732_096,
    }
    assert set(published) == set(P.KNOWN_MODELS)
    for name, n in published.items():
        assert P.KNOWN_MODELS[name].num_params("lm") == n, name


def _tiny_hf(kind: str, tied: bool = False):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        Qwen2Config,
        Qwen2ForCausalLM,
    )
    common = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied, pad_token_id=0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)), "lm"
    if kind == "llama_rm":
        return LlamaForSequenceClassification(LlamaConfig(num_labels=1, **common)), "scalar"
    return LlamaForCausalLM(LlamaConfig(**common)), "lm"


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("llama_rm", False), ("qwen2", False)])
def test_param_count_and_largest_layer_match_transformers_and_deepspeed(kind, tied, tmp_path):
    from deepspeed.runtime.zero.stage3 import model_to_params
    model, head = _tiny_hf(kind, tied)
    model.config.save_pretrained(tmp_path)
    shape = P.resolve_model(str(tmp_path))
    total, largest = model_to_params(model)  # DeepSpeed's own counting (shared params once)
    assert shape.num_params(head) == total == sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
    assert shape.largest_layer_params(head) == largest


# ------------------------------------------------------------------------------------------------ DeepSpeed


def _ds_table(fn, **kw) -> dict[str, tuple[float, float]]:
    """Run a DeepSpeed `*_all_cold` estimator (it prints, returns None); parse {options: (cpu_gb, gpu_gb)}."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(**kw)
    rows = re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.+)$", buf.getvalue(), flags=re.M)
    assert rows, buf.getvalue()
    # Option names print as "OffloadDeviceEnum.cpu" on this DeepSpeed, "cpu" on others.
    return {opts.replace(" ", "").replace("OffloadDeviceEnum.", ""): (float(c), float(g)) for c, g, opts in rows}


SETUPS = [  # (model, head, gpus_per_node, nodes)
    ("llama3-8b", "scalar", 8, 1), ("llama3-70b", "scalar", 8, 2), ("qwen2.5-14b", "lm", 4, 1),
    ("mistral-7b", "lm", 1, 1),
]


@pytest.mark.parametrize("name,head,gpn,nodes", SETUPS)
def test_zero3_states_match_deepspeed_estimator(name, head, gpn, nodes):
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )
    shape = P.KNOWN_MODELS[name]
    n, big = shape.num_params(head), shape.largest_layer_params(head)
    printed = _ds_table(estimate_zero3_model_states_mem_needs_all_cold, total_params=n, largest_layer_params=big,
                        num_gpus_per_node=gpn, num_nodes=nodes)
    for off_opt, off_par in [(False, False), (True, False), (True, True)]:
        ours = P.model_state_bytes(n, big, trainable=True, zero=3, offload_optimizer=off_opt, offload_param=off_par,
                                   dtype="bf16", gpus_per_node=gpn, nodes=nodes)
        ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
            n, big, num_gpus_per_node=gpn, num_nodes=nodes, cpu_offload=off_opt, cpu_offload_params=off_par,
            zero_init=True)
        # DeepSpeed truncates to int bytes; we keep floats: equal to within one byte each.
        assert abs(ours.gpu_bytes - ds_gpu) <= 1 and abs(ours.cpu_bytes_per_node - ds_cpu) <= 1
        key = (f"offload_param={'cpu' if off_par else 'none'},"
               f"offload_optimizer={'cpu' if off_opt else 'none'},zero_init=1")
        cpu_gb, gpu_gb = printed[key]  # the table the user sees from DeepSpeed, 2 decimals of GiB
        assert abs(ours.gpu_bytes / P.GIB - gpu_gb) <= 0.006 and abs(ours.cpu_bytes_per_node / P.GIB - cpu_gb) <= 0.006


@pytest.mark.parametrize("name,head,gpn,nodes", SETUPS)
def test_zero2_states_match_deepspeed_estimator(name, head, gpn, nodes):
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_cold,
    )
    shape = P.KNOWN_MODELS[name]
    n, big = shape.num_params(head), shape.largest_layer_params(head)
    printed = _ds_table(estimate_zero2_model_states_mem_needs_all_cold, total_params=n, num_gpus_per_node=gpn,
                        num_nodes=nodes)
    for off_opt in (False, True):
        ours = P.model_state_bytes(n, big, trainable=True, zero=2, offload_optimizer=off_opt, offload_param=False,
                                   dtype="bf16", gpus_per_node=gpn, nodes=nodes)
        ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=gpn, num_nodes=nodes,
                                                                cpu_offload=off_opt)
        assert abs(ours.gpu_bytes - ds_gpu) <= 1
        assert abs(ours.gpu_bytes / P.GIB - printed[f"offload_optimizer={'cpu' if off_opt else 'none'}"][1]) <= 0.006
        if off_opt and nodes > 1:
            # Known, exact difference: DeepSpeed's stage-2 host figure is n*max(4*all_gpus, 16)*1.5, i.e. it
            # neither splits the 16 B/param offloaded states over nodes nor counts the load copy per node.
            assert ours.cpu_bytes_per_node == n * max(4 * gpn, 16 / nodes) * 1.5 < ds_cpu
            assert ds_cpu == int(n * max(4 * gpn * nodes, 16) * 1.5)
        else:
            assert abs(ours.cpu_bytes_per_node - ds_cpu) <= 1


def test_zero_stage_ordering_and_frozen_models():
    n, big = 7_000_000_000, 500_000_000
    gpu = {z: P.model_state_bytes(n, big, trainable=True, zero=z, offload_optimizer=False, offload_param=False,
                                  dtype="bf16", gpus_per_node=8, nodes=1).gpu_bytes for z in range(4)}
    assert gpu[0] > gpu[1] > gpu[2] > gpu[3]
    assert gpu[0] == 20 * n  # 2 weights + 2 grads + 4 fp32 grads + 12 master/Adam, unsharded
    frozen = P.model_state_bytes(n, big, trainable=False, zero=3, offload_optimizer=False, offload_param=False,
                                 dtype="bf16", gpus_per_node=8, nodes=1)
    assert frozen.grads_bytes == frozen.optimizer_bytes == 0 and frozen.params_bytes == 2 * n / 8
    off = P.model_state_bytes(n, big, trainable=False, zero=3, offload_optimizer=False, offload_param=True,
                              dtype="bf16", gpus_per_node=8, nodes=1)
    assert off.gpu_bytes == 2 * big and off.cpu_bytes_per_node == 2 * n * 1.5


# ------------------------------------------------------------------------------------------------ activations

TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
ACT_CASES = [  # label, head, vocab, dtype, grad_ckpt, training, sequences (2 per preference pair), seq_len
    ("RM (seq-cls) fp32", "scalar", 1000, "fp32", False, True, 4, 256),
    ("RM (seq-cls) fp32 + grad ckpt", "scalar", 1000, "fp32", True, True, 4, 128),
    ("RM (seq-cls) bf16", "scalar", 1000, "bf16", False, True, 2, 128),  # CPU bf16 kernels are slow: smaller
    ("policy (causal LM, log-prob loss) fp32", "lm", 4000, "fp32", False, True, 4, 128),
    ("reference (causal LM, no_grad log-probs) fp32", "lm", 4000, "fp32", False, False, 4, 128),
]
ACT_TOLERANCE = 0.15  # measured 0.5-5% on torch 2.13 CPU; 15% leaves room for other kernels and versions


def _peak_allocated_bytes(fn) -> int:
    """Peak of the running sum of CPU allocator events (torch profiler, profile_memory) while `fn` runs.

    Counts every tensor allocated inside `fn` (saved activations, temporaries, gradients in flight) and
    nothing allocated before (weights, and .grad buffers already created by a warm-up step).
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    running = peak = 0
    for ev in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        running += ev["args"]["Bytes"]
        peak = max(peak, running)
    return peak


def measure_activation_case(head, vocab, dtype, grad_ckpt, training, batch, seq) -> tuple[int, float]:
    """(measured peak bytes, predicted bytes) for one forward(+backward) of a tiny Llama on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, pad_token_id=0, num_labels=1, attn_implementation="sdpa", **TINY)
    model = (LlamaForSequenceClassification if head == "scalar" else LlamaForCausalLM)(cfg)
    model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).train()
    if grad_ckpt:
        model.gradient_checkpointing_enable()  # the name every transformers 5.x has (5.24 aliases it)
    ids = torch.randint(1, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    ids[1, -17:], mask[1, -17:] = 0, 0  # one padded row: real batches are padded, so sdpa gets a mask
    for p in model.parameters():  # .grad buffers exist before the measured step: they are model states
        p.grad = torch.zeros_like(p)

    def step():
        if head == "scalar":
            loss = model(input_ids=ids, attention_mask=mask).logits.float().sum()
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None])
            loss = logp.sum()
        if training:
            loss.backward()

    if training:
        result = _peak_allocated_bytes(step)
    else:
        with torch.no_grad():
            result = _peak_allocated_bytes(step)
    shape = P.ModelShape("tiny", TINY["hidden_size"], TINY["num_hidden_layers"], TINY["num_attention_heads"],
                         TINY["num_key_value_heads"], TINY["intermediate_size"], vocab, False)
    predicted = P.activation_bytes(shape, batch_seqs=batch, seq_len=seq, dtype=dtype, grad_ckpt=grad_ckpt,
                                   head=head, training=training).total_bytes
    return result, predicted


@pytest.mark.parametrize("case", ACT_CASES, ids=[c[0] for c in ACT_CASES])
def test_activation_formula_matches_measured_cpu_peak(case, capsys):
    label, *args = case
    measured, predicted = measure_activation_case(*args)
    err = predicted / measured - 1
    with capsys.disabled():
        print(f"\n[activation check] {label}: measured {measured / 2**20:.2f} MiB, "
              f"predicted {predicted / 2**20:.2f} MiB, error {err:+.1%}")
    assert abs(err) <= ACT_TOLERANCE


# ------------------------------------------------------------------------------------------------ verdicts


def _rm(model, **kw):
    base = dict(job="rm", nodes=1, gpus_per_node=8, gpu_mem_gib=80, zero=3, dtype="bf16")
    return P.PlanInput(model=P.resolve_model(model), **{**base, **kw})


def test_70b_rm_on_8x80_zero3_without_offload_does_not_fit_and_a_fix_is_proposed():
    plan = P.make_plan(_rm("llama3-70b", micro_batch=1, seq_len=2048, grad_ckpt=True))
    assert not plan.fits
    assert plan.estimate.peak.params_bytes + plan.estimate.peak.optimizer_bytes > 80 * P.GIB  # states alone
    s = plan.suggestion
    assert s is not None and s.estimate.fits(s.input) and P.make_plan(s.input).fits
    assert s.steps == ("offload optimizer states to CPU (--offload-optimizer)",)


def test_8b_rm_on_8x80_zero3_mb4_seq2048_ckpt_fits():
    plan = P.make_plan(_rm("llama3-8b", micro_batch=4, seq_len=2048, grad_ckpt=True))
    assert plan.fits and plan.suggestion is None
    assert 15 * P.GIB < plan.estimate.peak.total_bytes < 60 * P.GIB


def test_search_prefers_first_single_change_then_shortest_combination():
    no_ckpt = P.make_plan(_rm("llama3-8b", micro_batch=4, seq_len=2048))
    assert not no_ckpt.fits and no_ckpt.suggestion.steps == ("enable gradient checkpointing (--grad-ckpt)",)
    # 70B at micro-batch 4 without checkpointing needs two changes; checkpointing comes first in the order.
    big = P.make_plan(_rm("llama3-70b", micro_batch=4, seq_len=2048))
    assert len(big.suggestion.steps) == 2 and big.suggestion.steps[0].startswith("enable gradient checkpointing")
    # A host-RAM limit rules out offload; then only more nodes help, and the search picks the fewest.
    capped_input = _rm("llama3-70b", micro_batch=1, seq_len=2048, grad_ckpt=True, cpu_mem_gib=512)
    capped = P.make_plan(capped_input)
    nodes = capped.suggestion.input.nodes
    assert capped.suggestion.steps == (f"1 -> {nodes} nodes (--nodes {nodes}, {8 * nodes} GPUs)",)
    assert not P.make_plan(dataclasses.replace(capped_input, nodes=nodes - 1)).fits


def test_ppo_vllm_share_sleep_and_start_failure():
    base = dict(model=P.resolve_model("llama3-8b"), job="ppo", micro_batch=1, grad_ckpt=True, vllm_tp=2,
                vllm_gpu_util=0.4, gen_batch=64, prompt_len=1024, gen_len=1024)
    awake = P.estimate(P.PlanInput(**base))
    asleep = P.estimate(P.PlanInput(**{**base, "vllm_sleep": True}))
    train_awake, train_asleep = awake.phases[0], asleep.phases[0]
    assert train_awake.vllm_weights_bytes + train_awake.vllm_kv_cache_bytes == pytest.approx(0.4 * 80 * P.GIB)
    assert train_asleep.total_bytes < train_awake.total_bytes
    assert asleep.cpu_bytes_per_node > awake.cpu_bytes_per_node  # sleeping weights parked on the host
    assert set(awake.roles) == {"actor", "critic", "reference", "reward_model", "vllm"}
    starved = P.estimate(P.PlanInput(**{**base, "vllm_tp": 1, "vllm_gpu_util": 0.15}))
    assert not starved.fits(P.PlanInput(**{**base, "vllm_tp": 1, "vllm_gpu_util": 0.15}))
    assert any("cannot start" in n for n in starved.notes)


def test_invalid_setups_are_rejected_with_reasons():
    with pytest.raises(ValueError, match="param offload needs ZeRO-3"):
        P.estimate(_rm("llama3-8b", zero=2, offload_param=True, offload_optimizer=True))
    with pytest.raises(ValueError, match="vllm_tp"):
        P.estimate(P.PlanInput(model=P.resolve_model("llama3-8b"), job="ppo", gpus_per_node=8, vllm_tp=3))


# ------------------------------------------------------------------------------------------------ inputs


def test_model_folder_config_is_read(tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = P.resolve_model(str(tmp_path))
    assert shape.num_params("lm") == P.KNOWN_MODELS["qwen2.5-7b"].num_params("lm")
    assert P.resolve_model(str(tmp_path / "config.json")) == shape


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        P.resolve_model("llama-9000b")
    assert "llama-9000b" in str(err.value) and all(n in str(err.value) for n in P.KNOWN_MODELS)
    assert P.resolve_model("meta-llama/Meta-Llama-3-70B-Instruct").name == "llama3-70b"
    assert P.resolve_model("Qwen/Qwen2.5-14B").name == "qwen2.5-14b"


def test_malformed_config_names_file_and_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "intermediate_size": 128}))
    with pytest.raises(P.ModelConfigError, match=re.escape(str(path)) + r".*'vocab_size'"):
        P.resolve_model(str(tmp_path))
    path.write_text("{not json")
    with pytest.raises(P.ModelConfigError, match=re.escape(str(path))):
        P.resolve_model(str(tmp_path))


def test_plan_from_training_config_names():
    ns = SimpleNamespace(model_name_or_path="llama3-8b", zero_stage=3, precision="bf16", micro_batch_size=4,
                         max_length=2048, gradient_checkpointing=True, offload_optimizer=False, offload_param=False,
                         learning_rate=1e-5)  # unrelated config fields are ignored
    plan = P.plan_from_namespace(ns, nodes=1, gpus_per_node=8, gpu_mem_gib=80)
    direct = P.make_plan(_rm("llama3-8b", micro_batch=4, seq_len=2048, grad_ckpt=True))
    assert plan.fits and plan.estimate.peak.total_bytes == direct.estimate.peak.total_bytes


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_json_last_line_parses(capsys):
    rc = cli.main(["--model", "llama3-70b", "--job", "rm", "--nodes", "2", "--gpus-per-node", "8",
                   "--gpu-mem-gib", "80", "--zero", "3", "--micro-batch", "1", "--seq-len", "4096", "--grad-ckpt",
                   "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    data = json.loads(out[-1])
    assert rc == (0 if data["fits"] else 1)
    assert {"phases", "peak_gib", "fits", "cpu_gib_per_node", "suggestion"} <= set(data)
    assert any(line.startswith("verdict:") for line in out)


def test_cli_module_entry_and_errors(tmp_path):
    def run(*a):
        return subprocess.run([sys.executable, "-m", "aplot_rlhf.cli.plan", *a], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    ok = run("--model", "llama3-8b", "--micro-batch", "4", "--seq-len", "2048", "--grad-ckpt", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout.strip().splitlines()[-1])["fits"] is True
    bad = run("--model", "nope-1b")
    assert bad.returncode == 2 and "known names" in bad.stderr and "llama3-8b" in bad.stderr
    (tmp_path / "config.json").write_text("{}")
    broken = run("--model", str(tmp_path))
    assert broken.returncode == 2 and "config.json" in broken.stderr and "hidden_size" in broken.stderr


if __name__ == "__main__":  # markdown rows for benchmarks/results/plan_activation_check.md
    torch.set_num_threads(2)
    print("| case | sequences x seq | measured peak (MiB) | predicted (MiB) | error |\n|---|---|---:|---:|---:|")
    for label, *args in ACT_CASES:
        m, p = measure_activation_case(*args)
        print(f"| {label} | {args[-2]} x {args[-1]} | {m / 2**20:.2f} | {p / 2**20:.2f} | {p / m - 1:+.1%} |")
