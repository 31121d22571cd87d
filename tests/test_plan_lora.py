"""The memory planner with LoRA: adapter counts against real peft models, states for the adapters only."""
import dataclasses
import json
import subprocess

import pytest

from aplot_rlhf.plan import (
    KNOWN_MODELS,
    LORA_LINEARS,
    PlanInput,
    estimate,
    lora_target_names,
    plan_from_namespace,
    resolve_model,
)
from helpers import PYTHON, REPO, python_env


@pytest.fixture(scope="module")
def gqa_llama_dir(tmp_path_factory):
    """A tiny Llama with grouped KV heads and a distinct intermediate size: every in/out size differs."""
    from transformers import LlamaConfig
    out = tmp_path_factory.mktemp("gqa_llama")
    LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, pad_token_id=0).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("targets", ["auto", "q_proj,v_proj", "down_proj"])
@pytest.mark.parametrize("head", ["scalar", "lm"])
def test_adapter_count_equals_a_real_peft_model(gqa_llama_dir, targets, head):
    pytest.importorskip("peft")
    from transformers import AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from aplot_rlhf.models.lora import HEAD_NAMES, apply_lora, trainable_summary
    config = AutoConfig.from_pretrained(gqa_llama_dir, num_labels=1)
    model = (LlamaForSequenceClassification if head == "scalar" else LlamaForCausalLM)(config)
    peft_model = apply_lora(model, rank=5, alpha=10, dropout=0.0, targets=[targets], heads=HEAD_NAMES)
    trainable, total = trainable_summary(peft_model)
    shape = resolve_model(gqa_llama_dir)
    assert shape.lora_params(5, lora_target_names(targets), head) == trainable
    assert total - trainable == shape.num_params(head) - (shape.hidden_size if head == "scalar" else 0)  # frozen base


def test_lora_states_are_for_the_adapters_only():
    shape = KNOWN_MODELS["llama3-8b"]
    full = PlanInput(shape, job="rm", gpus_per_node=8, zero=3, micro_batch=2, seq_len=1024)
    lora = dataclasses.replace(full, lora_rank=32)
    est_full, est_lora = estimate(full), estimate(lora)
    n_adapt = shape.lora_params(32, LORA_LINEARS, "scalar")
    assert n_adapt == est_lora.roles["reward_model"]["trainable_params"]
    assert 80e6 < n_adapt < 90e6  # 32 layers x rank 32 x (in + out) of 7 linears, plus the head
    train_full, train_lora = est_full.phases[0], est_lora.phases[0]
    # bf16 under ZeRO-3: 12 B of fp32 master weights and Adam moments per trainable parameter, sharded over 8
    assert train_lora.optimizer_bytes == pytest.approx(12 * n_adapt / 8)
    assert train_full.optimizer_bytes == pytest.approx(12 * shape.num_params("scalar") / 8)
    assert train_lora.grads_bytes < 0.02 * train_full.grads_bytes
    assert train_lora.params_bytes >= train_full.params_bytes  # the frozen base is still held (partitioned)
    assert train_lora.activations_bytes == train_full.activations_bytes


def test_lora_ppo_plans_no_reference_copy_and_adapters_for_actor_and_critic():
    shape = KNOWN_MODELS["llama3-8b"]
    inp = PlanInput(shape, job="ppo", gpus_per_node=8, lora_rank=16, lora_targets="q_proj,v_proj")
    roles = estimate(inp).roles
    assert "reference" not in roles  # the actor with adapters disabled
    assert roles["actor"]["trainable_params"] == shape.lora_params(16, ("q_proj", "v_proj"), "lm")
    assert roles["critic"]["trainable_params"] == shape.lora_params(16, ("q_proj", "v_proj"), "scalar")
    # an explicit --reference_model is its own frozen model again
    assert "reference" in estimate(dataclasses.replace(inp, reference_model=shape)).roles
    with pytest.raises(ValueError, match="lora targets"):
        estimate(dataclasses.replace(inp, lora_targets="qkv"))


def test_plan_reads_the_training_configs_lora_knobs(gqa_llama_dir):
    from aplot_rlhf.config import RMConfig
    cfg = RMConfig(model_name_or_path=gqa_llama_dir, train_data=["x"], lora_rank=8,
                   lora_target_modules=["q_proj", "k_proj"])
    plan = plan_from_namespace(cfg, gpus_per_node=1)
    assert plan.input.lora_rank == 8 and plan.input.lora_targets == "q_proj,k_proj"
    proc = subprocess.run([PYTHON, "-m", "aplot_rlhf.cli.plan", "--model", "llama3-8b", "--lora-rank", "32", "--json"],
                          env=python_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LoRA rank 32" in proc.stdout
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = KNOWN_MODELS["llama3-8b"].lora_params(32, LORA_LINEARS, "scalar")
    assert out["roles"]["reward_model"]["trainable_params"] == expected
    assert out["phases"]["train"]["optimizer_gib"] < 0.2
