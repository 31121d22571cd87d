"""The HF rollout's shared prefill (issue 24): a prompt repeated K times is run through the model once and its
key/value cache copied to its K samples. It must sample exactly what the unshared rollout samples."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def tiny_llama(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                         max_position_embeddings=128, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # peaked logits: a wrong position or a lost prompt token changes samples
    return model


def groups(K: int):
    gen = torch.Generator().manual_seed(3)
    distinct = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (9, 4, 7, 2)]  # left padding differs
    return distinct, [p for p in distinct for _ in range(K)]


@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head and grouped-query attention
def test_shared_prefill_samples_what_the_unshared_rollout_samples(kv_heads):
    from aplot_rlhf.rollout.hf import HFRollout
    model = tiny_llama(kv_heads)
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    shared, unshared = HFRollout(model, tok, zero3=False), HFRollout(model, tok, zero3=False, share_prompt=False)
    distinct, prompts = groups(K=4)
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, seeds=[17], return_logprobs=True)
    resp_s, lp_s = shared.generate(prompts, **kw)
    assert shared.last_prefill_rows == len(distinct)  # the prompts' forward ran once per distinct prompt
    resp_u, lp_u = unshared.generate(prompts, **kw)
    assert unshared.last_prefill_rows == len(prompts)
    assert resp_s == resp_u
    assert max(abs(a - b) for r_s, r_u in zip(lp_s, lp_u) for a, b in zip(r_s, r_u)) < 1e-5
    # the samples of one prompt still differ from one another: each row draws its own tokens
    assert len({tuple(r) for r in resp_s[:4]}) > 1
    # the engine's log-probs are those of the model's own forward over prompt + response
    with torch.no_grad():
        for p, r, lp in zip(prompts, resp_s, lp_s):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:len(p) + len(r) - 1]
            probs = torch.softmax(logits, -1)
            kept = torch.sort(probs, -1, descending=True).values
            # top-p 0.95 renormalizes over the nucleus: compare with the nucleus' own renormalization
            cut = (kept.cumsum(-1) - kept) < 0.95
            nucleus = (kept * cut).sum(-1)
            expect = torch.log(probs.gather(-1, torch.tensor(r)[:, None])[:, 0] / nucleus)
            assert torch.allclose(torch.tensor(lp), expect, atol=1e-4)


def test_distinct_prompts_and_greedy_evaluation_are_not_prefilled_twice():
    from aplot_rlhf.rollout.hf import HFRollout
    model = tiny_llama(2)
    backend = HFRollout(model, SimpleNamespace(pad_token_id=0, eos_token_id=1), zero3=False)
    distinct, _ = groups(K=1)
    greedy = backend.generate(distinct, max_new_tokens=8, temperature=0.0, top_p=1.0, seeds=[0])
    assert backend.last_prefill_rows == len(distinct)
    for p, r in zip(distinct, greedy):  # the argmax chain of the model itself
        ids = list(p)
        with torch.no_grad():
            for _ in r:
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert r == ids[len(p):]


def test_a_sliding_window_model_generates_unshared():
    from transformers import MistralConfig, MistralForCausalLM

    from aplot_rlhf.rollout.hf import HFRollout
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                           max_position_embeddings=128, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = MistralForCausalLM(config).eval()
    backend = HFRollout(model, SimpleNamespace(pad_token_id=0, eos_token_id=1), zero3=False)
    _, prompts = groups(K=2)
    backend.generate(prompts, max_new_tokens=4, temperature=1.0, top_p=1.0, seeds=[1])
    assert backend.share_prompt is False and backend.last_prefill_rows == len(prompts)
