"""--packing: packed rows (several sequences per row, positions restarting, block-diagonal attention) give
the padded batch's rewards, embeddings, loss, gradients, PPO log-probs and values; real models on CPU
(SDPA and eager with the 4D block mask; flash attention's varlen path needs flash_attn and a GPU).

Tolerances (fp32): rewards, embeddings, log-probs, values within 1e-5 absolute; loss within 1e-6;
gradients within 1e-4 of the largest gradient entry (the reduction order differs between layouts).
"""
import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch

from aplot_rlhf.data.collate import collate_pairs, collate_pairs_packed
from aplot_rlhf.data.pair_tokenizer import PairTokenizer
from aplot_rlhf.data.pairs import load_pairs
from aplot_rlhf.errors import ConfigError
from aplot_rlhf.losses import bt_loss
from aplot_rlhf.models.loader import load_tokenizer
from aplot_rlhf.models.packing import (
    attention_kwargs,
    check_packing_support,
    first_fit_rows,
    is_packed_row_mask,
    pack,
    pack_prompt_response,
)
from aplot_rlhf.models.reward import load_reward_model
from helpers import HH_PAIRS, PYTHON, REPO, free_port, python_env, save_tiny_llama

ATOL = 1e-5


def encoded_pairs(tok, n=6, max_length=48):
    pairs = PairTokenizer(tok, max_length).encode_pairs(load_pairs(str(HH_PAIRS))[:n + 4])[:n]
    # pad == eos for Llama tokenizers: a response ending in eos is read at its last non-pad token, as padded
    pairs[0] = dict(pairs[0], chosen_ids=pairs[0]["chosen_ids"][:-2] + [tok.pad_token_id] * 2)
    return pairs


def rm_outputs(model, pairs, pad_id, packed_capacity=None, varlen=False):
    """rewards, embeddings, loss and gradients of one BT step: padded, packed into rows of `packed_capacity`
    tokens, or (varlen) packed into one row."""
    model.zero_grad()
    if packed_capacity is None and not varlen:
        b = collate_pairs(pairs, pad_id)
        rewards, emb = model(b["input_ids"], b["attention_mask"], b["response_start"])
    else:
        b = collate_pairs_packed(pairs, pad_id, packed_capacity, model.reads_last_token)
        assert b["packed"]["input_ids"].shape[0] < 2 * len(pairs)  # several sequences really share rows
        rewards, emb = model(packed=b["packed"])
    B = len(pairs)
    loss = bt_loss(rewards[:B], rewards[B:], None, 0.0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return rewards.detach(), emb, loss.detach(), grads


def assert_same(padded, packed):
    (r0, e0, l0, g0), (r1, e1, l1, g1) = padded, packed
    assert (r0 - r1).abs().max() < ATOL, (r0, r1)
    assert (e0 - e1).abs().max() < ATOL
    assert abs(l0 - l1) < 1e-6
    assert set(g0) == set(g1) and g0
    scale = max(g.abs().max() for g in g0.values())
    worst = max((g0[n] - g1[n]).abs().max() for n in g0)
    assert worst <= 1e-4 * scale, (worst, scale)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pooling", ["token", "mean"])
@pytest.mark.parametrize("which", ["decoder", "encoder"])
def test_packed_rm_equals_padded(which, pooling, attn, tiny_llama_dir, minilm_path):
    path = tiny_llama_dir if which == "decoder" else minilm_path
    tok = load_tokenizer("reward", path)
    torch.manual_seed(0)
    model = load_reward_model(path, tokenizer=tok, pooling=pooling, attn_implementation=attn)
    model.eval()  # dropout off: both layouts see the same function
    model.check_packable(attn)
    with torch.no_grad():  # a head that is not ~0, so differences in the head's input show
        head = model.hf.score if which == "decoder" else model.hf.classifier
        head.weight.normal_(0, 1.0)
    pairs = encoded_pairs(tok)
    pad = tok.pad_token_id
    padded = rm_outputs(model, pairs, pad)
    assert_same(padded, rm_outputs(model, pairs, pad, packed_capacity=96))
    # the failure this guards against: attention leaking across the sequences of a row changes the rewards
    b = collate_pairs_packed(pairs, pad, 96, model.reads_last_token)
    leaky = dict(b["packed"], segment=torch.zeros_like(b["packed"]["segment"]))
    with torch.no_grad():
        r_leak, _ = model(packed=leaky)
    assert (r_leak - padded[0]).abs().max() > 1e-3


def test_first_fit_rows_respects_capacity_and_keeps_every_sequence():
    lengths = [30, 10, 50, 20, 40, 5, 64]
    rows = first_fit_rows(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) == 4  # 219 tokens: first fit decreasing needs 4 rows of 64
    assert first_fit_rows([100, 3], 64) == [[0], [1]]  # longer than a row: a row of its own
    layout = pack([[5, 6, 7], [8, 9]], pad_id=0, capacity=None)
    assert layout["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert layout["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert layout["cu_seq_lens"].tolist() == [0, 3, 5] and layout["max_length"] == 3


class _Cfg:
    def __init__(self, impl):
        self._attn_implementation = impl


def test_flash_attention_gets_varlen_kwargs_and_other_kernels_are_refused(caplog):
    layout = pack([[5, 6, 7], [8, 9]], pad_id=0, capacity=None)
    kw = attention_kwargs(layout, _Cfg("flash_attention_2"), causal=True, dtype=torch.float32)
    # a marked all-ones mask, not None: None makes transformers search position_ids (a host sync, issue 25 item 8)
    assert is_packed_row_mask(kw["attention_mask"]) and kw["attention_mask"].all()
    assert kw["cu_seq_lens_q"].dtype == torch.int32
    encoder = attention_kwargs(layout, _Cfg("flash_attention_2"), causal=False, dtype=torch.float32)
    assert encoder["attention_mask"] is None
    assert kw["cu_seq_lens_k"].tolist() == [0, 3, 5] and kw["max_length_q"] == 3
    with pytest.raises(ValueError, match="one-row"):
        attention_kwargs(pack([[5, 6], [8, 9]], 0, capacity=2), _Cfg("flash_attention_2"), True, torch.float32)
    mask = attention_kwargs(pack([[5, 6], [8, 9]], 0, capacity=4), _Cfg("sdpa"), True, torch.float32)["attention_mask"]
    assert mask[0, 0].tolist() == [[True, False, False, False], [True, True, False, False],
                                   [False, False, True, False], [False, False, True, True]]
    with pytest.raises(ConfigError, match="flex_attention"):
        check_packing_support(_Cfg("flex_attention"))
    with caplog.at_level(logging.WARNING):
        check_packing_support(_Cfg("sdpa"), requested="flash_attention_2")
    assert "flash_attn installed" in caplog.text


@pytest.mark.parametrize("attn,capacity", [("sdpa", None), ("sdpa", 40), ("eager", None), ("eager", 40),
                                           ("aplot_varlen_sdpa", None)])
def test_packed_ppo_logprobs_and_values_equal_padded(attn, capacity, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from aplot_rlhf.models.policy import Critic
    from aplot_rlhf.trainers.ppo_layout import (
        packed_response_logprobs,
        packed_response_values,
        pad_prompt_response,
        response_logprobs,
        response_values,
        trim_left_padding,
    )
    torch.manual_seed(0)
    from aplot_rlhf.models.packing import ensure_registered
    actor = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation=ensure_registered(attn)).eval()
    head = torch.nn.Linear(actor.config.hidden_size, 1)
    critic = Critic(actor.model, head).eval()
    pad = actor.config.pad_token_id
    g = torch.Generator().manual_seed(1)
    lens = [(9, 5), (3, 12), (17, 1), (6, 0), (12, 8)]  # one empty response: prompt only, all masked
    prompts = [torch.randint(3, 500, (p,), generator=g).tolist() for p, _ in lens]
    responses = [torch.randint(3, 500, (r,), generator=g).tolist() for _, r in lens]
    responses[1][-1] = pad  # an eos (== pad) that the policy sampled is a real token of the response
    ids, attn_mask, posids, tokens, mask = pad_prompt_response(prompts, responses, pad)
    seqs = trim_left_padding(ids, attn_mask, posids)
    layout = pack_prompt_response(prompts, responses, pad, capacity)
    if capacity is not None:
        assert 1 < layout["input_ids"].shape[0] < len(prompts)
    with torch.no_grad():
        lp0, ent0 = response_logprobs(actor, *seqs, tokens, with_entropy=True, temperature=0.7)
        lp1, ent1 = packed_response_logprobs(actor, layout, tokens, with_entropy=True, temperature=0.7)
        v0 = response_values(critic, *seqs, tokens.shape[1])
        v1 = packed_response_values(critic, layout)
    m = mask.bool()
    assert lp1.shape == lp0.shape and v1.shape == v0.shape
    assert (lp0 - lp1)[m].abs().max() < ATOL
    assert (ent0 - ent1)[m].abs().max() < ATOL
    assert (v0 - v1)[m].abs().max() < ATOL


# ------------------------------------------------------------------------------- end to end

def run_rm(model_dir, out, packing, zero_stage, extra=()):
    from test_rm_train import rm_args
    flags = rm_args(model_dir, out, zero_stage=zero_stage, max_steps=3, save_steps=0, loss="aplot", max_train_pairs=12,
                    max_eval_pairs=6, micro_batch_size=3, gradient_accumulation_steps=1) + ["--no-export"]
    if packing:
        flags.append("--packing")
    flags += list(extra)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
           "-m", "aplot_rlhf.cli.train_rm", *flags]
    proc = subprocess.run(cmd, env=python_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}, torch.load(Path(out) / "eval_rewards.pt")


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory):
    """padded_run(key, run) -> run(folder)'s result, computed once per module: the padded reference a packed
    and a prompt-shared run of the same settings are both compared with."""
    done = {}

    def get(key, run):
        if key not in done:
            done[key] = run(tmp_path_factory.mktemp(f"padded_{key}"))
        return done[key]
    return get


def padded_rm(padded_run, model_dir, which):
    """The padded ZeRO-2 reference run of `which` model, trained once per module."""
    return padded_run(f"rm_{which}", lambda d: run_rm(model_dir, d / "run", packing=False, zero_stage=2))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["decoder", "encoder"])
def test_train_rm_with_packing_matches_the_padded_run(which, tiny_llama_dir, minilm_path, tmp_path, padded_run):
    # the packed run under ZeRO-3 (partitioned weights gathered by DeepSpeed's hooks around the packed forward);
    # --packing with sdpa runs varlen_sdpa, and MiniLM (read at [CLS]) its last layer at [CLS] rows only
    path = tiny_llama_dir if which == "decoder" else minilm_path
    padded, padded_eval = padded_rm(padded_run, path, which)
    packed, packed_eval = run_rm(path, tmp_path / "packed", packing=True, zero_stage=3)
    assert sorted(packed) == [1, 2, 3]
    for step in packed:  # same data, same updates: the same loss curve and token counts
        assert packed[step]["train/loss"] == pytest.approx(padded[step]["train/loss"], abs=1e-4)
        assert packed[step]["train/tokens_per_s"] > 0
    for name in padded_eval:  # evaluation (score_pairs) runs packed too
        for side in ("chosen", "rejected"):
            assert torch.allclose(packed_eval[name][side], padded_eval[name][side], atol=1e-3)


@pytest.mark.slow
def test_train_rm_with_share_prompt_matches_the_padded_run(tiny_llama_dir, tmp_path, padded_run):
    # issue 24: each pair's prompt once, chosen and rejected after it, under ZeRO-3; evaluation shares it too
    padded, padded_eval = padded_rm(padded_run, tiny_llama_dir, "decoder")
    shared, shared_eval = run_rm(tiny_llama_dir, tmp_path / "shared", packing=False, zero_stage=3,
                                 extra=["--share_prompt"])
    assert sorted(shared) == [1, 2, 3]
    for step in shared:
        assert shared[step]["train/loss"] == pytest.approx(padded[step]["train/loss"], abs=1e-4)
    for name in padded_eval:
        for side in ("chosen", "rejected"):
            assert torch.allclose(shared_eval[name][side], padded_eval[name][side], atol=1e-3)


def run_ppo(model_dir, out, extra=()):
    """Two PPO iterations in one process under ZeRO-3, groups of 2 samples per prompt (what --share_prompt
    shares); -> the metrics rows."""
    from test_ppo import ppo_flags, run_check
    (r,) = run_check(ppo_flags(model_dir, out, "hf", zero_stage=3, ppo_iterations=2, samples_per_prompt=2,
                               rollout_batch_size=4) + list(extra), free_port(), nproc=1)
    assert len(r["rewards"]) == 2 and r["greedy_equal"]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_first_iteration_equal(padded_rows, other_rows):
    """The first iteration samples from the same weights: the same rollout, so experience (log-probs, KL,
    values, advantages) and the losses of the PPO epoch agree; afterwards sampling may diverge."""
    for key in ("ppo/reward/raw_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "ppo/entropy",
                "ppo/clip_frac"):
        assert other_rows[0][key] == pytest.approx(padded_rows[0][key], rel=1e-3, abs=1e-6), key


@pytest.mark.slow
def test_ppo_with_packing_matches_the_padded_run(char_llama_dir, tmp_path, padded_run):
    padded = padded_run("ppo", lambda d: run_ppo(char_llama_dir, d / "run"))
    assert_first_iteration_equal(padded, run_ppo(char_llama_dir, tmp_path / "packed", ["--packing"]))


@pytest.mark.slow
def test_ppo_with_share_prompt_matches_the_padded_run(char_llama_dir, tmp_path, padded_run):
    # issue 24: each prompt once per micro-batch, its samples after it
    padded = padded_run("ppo", lambda d: run_ppo(char_llama_dir, d / "run"))
    assert_first_iteration_equal(padded, run_ppo(char_llama_dir, tmp_path / "shared", ["--share_prompt"]))


def test_packed_micro_batch_of_short_responses_lines_up_with_the_rollout(tiny_llama_dir):
    """A micro-batch whose responses all stopped early still yields [b, T] with the rollout's T (the
    experience tensors' width), equal to the padded path, whose first column comes from the host."""
    from transformers import AutoModelForCausalLM

    from aplot_rlhf.trainers.ppo_layout import (
        first_column,
        packed_response_logprobs,
        pad_prompt_response,
        response_logprobs,
        trim_left_padding,
    )
    torch.manual_seed(0)
    actor = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    pad = actor.config.pad_token_id
    g = torch.Generator().manual_seed(2)
    lens = [(4, 12), (7, 2), (5, 3), (20, 9)]  # rows 1-2: short responses and short prompts
    prompts = [torch.randint(3, 500, (p,), generator=g).tolist() for p, _ in lens]
    responses = [torch.randint(3, 500, (r,), generator=g).tolist() for _, r in lens]
    ids, attn_mask, posids, tokens, mask = pad_prompt_response(prompts, responses, pad)
    rows = [1, 2]
    P = ids.shape[1] - tokens.shape[1]
    first = first_column(prompts, rows, P)
    assert first == int(attn_mask[rows].any(0).nonzero()[0])  # what the device would have said
    seqs = trim_left_padding(ids[rows], attn_mask[rows], posids[rows], first)
    layout = pack_prompt_response([prompts[r] for r in rows], [responses[r] for r in rows], pad, None,
                                  width=tokens.shape[1])
    with torch.no_grad():
        lp0 = response_logprobs(actor, *seqs, tokens[rows])
        lp1 = packed_response_logprobs(actor, layout, tokens[rows])
    assert lp1.shape == lp0.shape == (2, 12)
    m = mask[rows].bool()
    assert (lp0 - lp1)[m].abs().max() < ATOL


@pytest.mark.parametrize("which", ["decoder", "encoder"])
def test_packed_rm_with_lora_adapters_equals_padded(which, tiny_llama_dir, minilm_path):
    """--lora_rank with --packing: the head and backbone are found through peft's wrapper."""
    from aplot_rlhf.models.lora import HEAD_NAMES, apply_lora
    path = tiny_llama_dir if which == "decoder" else minilm_path
    tok = load_tokenizer("reward", path)
    torch.manual_seed(0)
    model = load_reward_model(path, tokenizer=tok)
    model.hf = apply_lora(model.hf, rank=4, alpha=8.0, dropout=0.0, targets=["auto"], heads=HEAD_NAMES)
    model.eval()
    with torch.no_grad():  # adapters that change the function, so a wrong path would show
        for name, p in model.hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pairs = encoded_pairs(tok)
    pad = tok.pad_token_id
    assert_same(rm_outputs(model, pairs, pad), rm_outputs(model, pairs, pad, packed_capacity=96))


# ------------------------------------------------------------------------------- varlen sdpa

@pytest.fixture(scope="module")
def gqa_llama_dir(smol_tokenizer_dir, tmp_path_factory) -> str:
    """The tiny Llama with grouped-query attention (4 query heads share 2 key/value heads)."""
    return save_tiny_llama(smol_tokenizer_dir, tmp_path_factory.mktemp("gqa_llama"), num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32)


def ragged_pairs(tok):
    """encoded_pairs with sequences of different lengths (the window cuts them all to 48 tokens), so the
    per-sequence attention of varlen_sdpa really pads; pair 0 keeps its trailing pad tokens."""
    pairs = encoded_pairs(tok)
    for i, p in enumerate(pairs[1:], 1):
        for side, cut in (("chosen", 48 - 5 * i), ("rejected", 47 - 3 * i)):
            n = max(cut, p[side + "_start"] + 4)
            p[side + "_ids"] = p[side + "_ids"][:n]
    return pairs


def varlen_model(path, pooling):
    """A reward model as train_rm --packing sets it up: loaded with sdpa, switched to varlen_sdpa."""
    from aplot_rlhf.models.packing import VARLEN_SDPA, capacity_for
    tok = load_tokenizer("reward", path)
    torch.manual_seed(0)
    model = load_reward_model(path, tokenizer=tok, pooling=pooling, attn_implementation="sdpa")
    model.eval()
    with torch.no_grad():  # a head that is not ~0, so differences in the head's input show
        head = model.hf.score if model.reads_last_token else model.hf.classifier
        head.weight.normal_(0, 1.0)
    pairs = ragged_pairs(tok)
    sdpa_rewards = rm_outputs(model, pairs, tok.pad_token_id)[0]
    model.prepare_packing("sdpa")
    assert model.config._attn_implementation == VARLEN_SDPA and capacity_for(model.config, 48) is None
    return model, tok, pairs, sdpa_rewards


@pytest.mark.parametrize("pooling", ["token", "mean"])
@pytest.mark.parametrize("which", ["decoder", "gqa_decoder", "encoder"])
def test_varlen_sdpa_rm_equals_padded(which, pooling, tiny_llama_dir, gqa_llama_dir, minilm_path):
    """One row of real tokens, attention padded per sequence: the padded batch's rewards, embeddings,
    loss and gradients; and a padded forward after the switch is still transformers' sdpa. The encoder
    with token pooling also covers its last layer run at [CLS] only; with mean pooling, the full layer."""
    from aplot_rlhf.models.packing import trims_bert_last_layer
    path = {"decoder": tiny_llama_dir, "gqa_decoder": gqa_llama_dir, "encoder": minilm_path}[which]
    model, tok, pairs, sdpa_rewards = varlen_model(path, pooling)
    pad = tok.pad_token_id
    padded = rm_outputs(model, pairs, pad)
    assert torch.equal(padded[0], sdpa_rewards)
    b = collate_pairs_packed(pairs, pad, None, model.reads_last_token)["packed"]
    lengths = b["length"].tolist()
    assert b["input_ids"].shape == (1, sum(lengths)) and len(set(lengths)) > 1  # no padding; sequences differ in length
    # a BERT encoder read at [CLS] runs its last layer at the [CLS] rows only (packing.bert_last_layer_at)
    assert trims_bert_last_layer(model.hf.bert if which == "encoder" else model.hf.model) == (which == "encoder")
    assert_same(padded, rm_outputs(model, pairs, pad, varlen=True))


@pytest.mark.parametrize("which", ["decoder", "encoder"])
def test_varlen_sdpa_fails_the_equivalence_without_its_mask(which, tiny_llama_dir, minilm_path, monkeypatch):
    """The equivalence above detects a dropped key-padding mask (encoder) or causal flag (decoder)."""
    model, tok, pairs, _ = varlen_model(tiny_llama_dir if which == "decoder" else minilm_path, "token")
    pad = tok.pad_token_id
    padded = rm_outputs(model, pairs, pad)
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def unmasked(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append(attn_mask is not None or is_causal)
        return real_sdpa(q, k, v, dropout_p=dropout_p, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", unmasked)
    packed = rm_outputs(model, pairs, pad, varlen=True)
    assert calls and all(calls)  # every layer's attention had a mask to drop
    with pytest.raises(AssertionError):
        assert_same(padded, packed)


@pytest.mark.parametrize("which", ["decoder", "encoder"])
def test_varlen_sdpa_with_lora_and_gradient_checkpointing_equals_padded(which, tiny_llama_dir, minilm_path):
    """peft's wrapper and recomputed activations (the backward re-runs attention with the same kwargs)."""
    from aplot_rlhf.models.lora import HEAD_NAMES, apply_lora
    path = tiny_llama_dir if which == "decoder" else minilm_path
    tok = load_tokenizer("reward", path)
    torch.manual_seed(0)
    model = load_reward_model(path, tokenizer=tok, gradient_checkpointing=True)
    model.hf = apply_lora(model.hf, rank=4, alpha=8.0, dropout=0.0, targets=["auto"], heads=HEAD_NAMES,
                          gradient_checkpointing=True)
    model.train()
    from aplot_rlhf.models.dropout import disable_dropout
    disable_dropout(model)
    with torch.no_grad():
        for name, p in model.hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.prepare_packing("sdpa")
    pairs = ragged_pairs(tok)
    pad = tok.pad_token_id
    assert_same(rm_outputs(model, pairs, pad), rm_outputs(model, pairs, pad, varlen=True))


def test_varlen_sdpa_is_chosen_only_for_sdpa_and_refuses_what_it_cannot_do(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from aplot_rlhf.models.packing import VARLEN_SDPA, use_varlen_sdpa, varlen_sdpa_attention_forward
    eager = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager")
    assert not use_varlen_sdpa(eager) and eager.config._attn_implementation == "eager"
    # the name works as --attn_implementation too: each loader registers it (one per fresh process)
    loaders = {"load_model('actor')": "load_model('actor', p, attn_implementation=a).config",
               "load_critic": ("load_critic('actor', reward_path='', actor_path=p, "
                               "attn_implementation=a).backbone.config"),
               "load_reward_model": ("load_reward_model(p, tokenizer=load_tokenizer('reward', p), "
                                     "attn_implementation=a).config")}
    for name, call in loaders.items():
        code = ("import sys; from aplot_rlhf.models.policy import load_critic; "
                "from aplot_rlhf.models.loader import load_model, load_tokenizer; "
                "from aplot_rlhf.models.reward import load_reward_model; "
                f"p, a = sys.argv[1], sys.argv[2]; print({call}._attn_implementation)")
        out = subprocess.run([PYTHON, "-c", code, tiny_llama_dir, VARLEN_SDPA], env=python_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.split()[-1] == VARLEN_SDPA, (name, out.stderr[-3000:])
    q = torch.randn(1, 2, 5, 8)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)

    class Windowed(torch.nn.Module):
        is_causal, sliding_window = True, 4
    with pytest.raises(NotImplementedError, match="sliding windows"):
        varlen_sdpa_attention_forward(Windowed(), q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=3)
    with pytest.raises(ValueError, match="one row"):
        varlen_sdpa_attention_forward(torch.nn.Module(), q.expand(2, -1, -1, -1), q, q, None, cu_seq_lens_q=cu,
                                      max_length_q=3)


def test_length_buckets_keep_every_sequence_and_cut_the_attention_work():
    from aplot_rlhf.models.packing import attention_slots, length_buckets
    lengths = [98, 12, 128, 40, 41, 97, 5, 120]
    buckets = length_buckets(lengths, groups=3)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths))) and len(buckets) == 3
    widths = [max(lengths[i] for i in b) for b in buckets]
    assert widths == sorted(widths, reverse=True)
    work = sum(len(b) * w * w for b, w in zip(buckets, widths))
    assert work < len(lengths) * 128 ** 2 * 0.6  # one bucket padded to 128 does much more
    assert length_buckets([7], groups=4) == [[0]]
    assert attention_slots([0, 3], [3, 2])["attn_buckets"] == ((1, 3), (1, 2))  # two calls beat padding 2 to 3
    s = attention_slots([0, 3], [3, 2], groups=1)
    assert s["attn_buckets"] == ((2, 3),)
    assert s["attn_slot_token"].tolist() == [0, 1, 2, 3, 4, 4] and s["attn_slot_valid"].tolist() == [1, 1, 1, 1, 1, 0]
    assert s["attn_token_slot"].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_slots", [False, True])
def test_varlen_sdpa_attention_equals_per_sequence_attention(causal, with_slots):
    """The attention op alone, its output and input gradients, against sdpa run on each sequence by
    itself; with the layout's length buckets and with the varlen kwargs only (one bucket)."""
    from aplot_rlhf.models.packing import SLOTS_KWARG, pack, varlen_sdpa_attention_forward
    g = torch.Generator().manual_seed(0)
    lengths = [9, 3, 17, 1, 12, 12, 6]
    layout = pack([[1] * n for n in lengths], pad_id=0, capacity=None)
    T, H, D = sum(lengths), 2, 8
    q, k, v = (torch.randn(1, H, T, D, generator=g, requires_grad=True) for _ in range(3))

    class Attn(torch.nn.Module):
        is_causal = causal
    kw = {"cu_seq_lens_q": layout["cu_seq_lens"], "cu_seq_lens_k": layout["cu_seq_lens"],
          "max_length_q": layout["max_length"]}
    if with_slots:
        assert len(layout["attn_buckets"]) > 1 and not layout["attn_slot_valid"].all()  # buckets, with padding
        kw[SLOTS_KWARG] = tuple(layout[k] for k in ("attn_slot_token", "attn_slot_valid", "attn_token_slot",
                                                    "attn_buckets"))
    out, _ = varlen_sdpa_attention_forward(Attn(), q, k, v, None, scaling=0.3, **kw)
    ref, at = [], 0
    for n in lengths:
        sl = slice(at, at + n)
        ref.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl],
                                                                    is_causal=causal, scale=0.3))
        at += n
    ref = torch.cat(ref, dim=2).transpose(1, 2)
    assert out.shape == (1, T, H, D) and (out - ref).abs().max() < 1e-5
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() < 1e-5
