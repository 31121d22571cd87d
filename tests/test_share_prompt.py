"""--share_prompt (issue 24, items 1-2): a prompt laid out once, its responses after it, each attending to the
prompt and to itself only, with positions continuing from the prompt's length, gives exactly the unshared
forwards' rewards, embeddings, APLOT margins, log-probs, entropies, values, losses and gradients.

Three architectures, random weights, fp32, CPU (sdpa, and eager for one): a tiny Llama (MHA), a GQA Llama
(4 query heads over 1 key/value head), and SmolLM2-135M's shape (hidden 576, 9 heads over 3 key/value heads,
head_dim 64, tied embeddings, rope theta 1e5, its tokenizer's 49152 tokens) cut to 2 layers. Outputs agree to
1e-5; gradients to 1e-5 of the largest gradient entry (the sums run in another order). Each mutation test
breaks one part of the layout (a sibling visible, positions restarting, the first token's logit lost) and
shows the comparison then fails. FlexAttention's block mask runs forward-only on CPU (torch has no CPU
backward for it): one slow test compares it with the dense mask.
"""
import pytest
import torch
from torch import nn

from aplot_rlhf.data.collate import collate_pairs, collate_pairs_shared
from aplot_rlhf.data.pair_tokenizer import PairTokenizer
from aplot_rlhf.data.pairs import load_pairs
from aplot_rlhf.errors import ConfigError
from aplot_rlhf.losses import bt_loss
from aplot_rlhf.models import packing
from aplot_rlhf.models.policy import Critic
from aplot_rlhf.models.reward import RewardModel
from aplot_rlhf.ot import sinkhorn_margin
from aplot_rlhf.trainers.ppo_layout import Layout, logprobs_on, values_on
from helpers import HH_PAIRS

ATOL = 1e-5
ARCHS = {
    "llama": dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                  tie_word_embeddings=True),
    "gqa_llama": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1,
                      head_dim=32, tie_word_embeddings=False),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
}


@pytest.fixture(scope="module")
def smol_tok(smol_tokenizer_dir):
    from aplot_rlhf.models.loader import load_tokenizer
    return load_tokenizer("reward", smol_tokenizer_dir)


def llama_config(arch: str, tok, attn: str = "sdpa"):
    from transformers import LlamaConfig
    config = LlamaConfig(vocab_size=len(tok), num_hidden_layers=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **ARCHS[arch])
    config._attn_implementation = attn
    return config


def actor_and_critic(arch, tok, attn="sdpa"):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    actor = LlamaForCausalLM(llama_config(arch, tok, attn)).eval()
    backbone = LlamaForCausalLM(llama_config(arch, tok, attn)).model.eval()
    critic = Critic(backbone, nn.Linear(backbone.config.hidden_size, 1)).eval()
    return actor, critic


# three prompts, K = 3 samples each (one empty response, one of a single token), then a prompt of its own
PROMPTS = [[11, 12, 13, 14, 15, 16, 17]] * 3 + [[21, 22]] * 3 + [[31, 32, 33, 34]] * 3 + [[41]]
RESPONSES = [[101, 102, 103], [104, 105, 106, 107, 108], [109], [110, 111], [], [112, 113, 114, 115, 116, 117],
             [118, 119, 120, 121], [122, 123, 124, 125], [126], [127, 128, 129]]
T = 6


def ppo_outputs(actor, critic, layout: Layout, tokens, mask):
    """Log-probs, entropies and values [B, T] (masked), a loss of all three, and every parameter's gradient."""
    actor.zero_grad()
    critic.zero_grad()
    lp, ent = logprobs_on(actor, layout, tokens, with_entropy=True, temperature=0.7)
    values = values_on(critic, layout)
    loss = ((lp * 0.3 + ent * 0.1 + values ** 2) * mask).sum()
    loss.backward()
    grads = {f"{who}.{n}": p.grad.detach().clone() for who, m in (("actor", actor), ("critic", critic))
             for n, p in m.named_parameters() if p.grad is not None}
    return (lp * mask).detach(), (ent * mask).detach(), (values * mask).detach(), loss.detach(), grads


def worst(a, b) -> float:
    """The largest difference of two ppo_outputs / rm_outputs: outputs absolute, gradients relative to the
    largest gradient entry."""
    *outs_a, grads_a = a
    *outs_b, grads_b = b
    diff = max(float((x - y).abs().max()) for x, y in zip(outs_a, outs_b))
    assert grads_a.keys() == grads_b.keys() and grads_a
    scale = max(float(g.abs().max()) for g in grads_a.values())
    return max(diff, max(float((grads_a[k] - grads_b[k]).abs().max()) for k in grads_a) / scale)


def ppo_case(tok):
    from aplot_rlhf.trainers.ppo_layout import pad_prompt_response
    _, _, _, tokens, mask = pad_prompt_response(PROMPTS, RESPONSES, tok.pad_token_id, T)
    return tokens, mask


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("gqa_llama", "sdpa"),
                                       ("smollm2", "sdpa"), ("llama", "aplot_varlen_sdpa")])
def test_shared_ppo_forwards_equal_unshared(arch, attn, smol_tok):
    if attn == packing.VARLEN_SDPA:
        packing.register_varlen_sdpa()
    actor, critic = actor_and_critic(arch, smol_tok, attn)
    tokens, mask = ppo_case(smol_tok)
    pad = smol_tok.pad_token_id
    padded = Layout.build("padded", PROMPTS, RESPONSES, pad, T, "cpu")
    shared = Layout.build("shared", PROMPTS, RESPONSES, pad, T, "cpu", capacity=40)
    # the prompts really are laid out once: 4 prompts of 14 tokens, not 10 of 46
    assert shared.batch["n_tokens"] == 14 + sum(map(len, RESPONSES))
    assert shared.batch["input_ids"].shape[0] >= 2  # capacity 40: first-fit rows, groups side by side
    diff = worst(ppo_outputs(actor, critic, padded, tokens, mask), ppo_outputs(actor, critic, shared, tokens, mask))
    assert diff < ATOL, diff


def test_shared_ppo_layout_is_exact_only_with_each_part(smol_tok, monkeypatch):
    """The exactness test above fails when a response sees a sibling, when a response's positions restart at 0,
    or when its first token is read from anything but the prompt's last logit."""
    actor, critic = actor_and_critic("gqa_llama", smol_tok)
    tokens, mask = ppo_case(smol_tok)
    pad = smol_tok.pad_token_id
    want = ppo_outputs(actor, critic, Layout.build("padded", PROMPTS, RESPONSES, pad, T, "cpu"), tokens, mask)

    def shared_diff(**change):
        layout = Layout.build("shared", PROMPTS, RESPONSES, pad, T, "cpu", capacity=None)
        layout.batch.update(change.get("batch", {}))
        if "resp_pos" in change:
            layout.resp_pos = layout.resp_keep = change["resp_pos"]
            layout.keep = 0  # every column kept (transformers' 0): resp_keep indexes all R*L positions
        return worst(want, ppo_outputs(actor, critic, layout, tokens, mask))

    assert shared_diff() < ATOL
    allowed = packing.shared_allowed
    with monkeypatch.context() as m:  # a response attends to its earlier siblings too
        m.setattr(packing, "shared_allowed", lambda seg, branch: allowed(seg, branch.clamp(max=0)))
        assert shared_diff() > 1e-3
    layout = Layout.build("shared", PROMPTS, RESPONSES, pad, T, "cpu", capacity=None)
    assert shared_diff(resp_pos=layout.resp_pos) < ATOL  # every logit kept, read at resp_pos: still exact
    pos, branch = layout.batch["position_ids"], layout.batch["branch"]
    restarted = pos.clone()  # each response's positions from 0, as if it were a sequence of its own
    for b in range(1, int(branch.max()) + 1):
        at = branch == b
        restarted[at] = pos[at] - pos[at].min() if at.any() else pos[at]
    assert shared_diff(batch={"position_ids": restarted}) > 1e-3
    lost_first = layout.resp_pos.clone()
    for b, r in enumerate(RESPONSES):
        if len(r) > 1:  # token 0 read from the response's own first position instead of the prompt's last
            lost_first[b, 0] = lost_first[b, 1]
    assert shared_diff(resp_pos=lost_first) > 1e-3


def test_shared_layout_positions_and_mask():
    layout = packing.pack_prompt_shared([[5, 6, 7], [5, 6, 7], [8]], [[9, 10], [11], [12, 13]], pad_id=0,
                                        capacity=None, width=2)
    assert layout["input_ids"].tolist() == [[5, 6, 7, 9, 10, 11, 8, 12, 13]]
    assert layout["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2]]
    # response t=0 is predicted by the prompt's last token (flat 2, shared), t=1 by the response's own token 0
    assert layout["resp_pos"].tolist() == [[2, 3], [2, 0], [6, 7]]
    allowed = packing.shared_allowed(layout["segment"], layout["branch"])[0, 0]
    assert allowed[5].tolist() == [True, True, True, False, False, True, False, False, False]  # not its sibling
    assert allowed[4].tolist() == [True, True, True, True, True, False, False, False, False]
    assert allowed[8].tolist() == [False] * 6 + [True] * 3


# ------------------------------------------------------------------------------------------- reward model

def encoded_pairs(tok, n=5, max_length=256):
    pairs = PairTokenizer(tok, max_length).encode_pairs(load_pairs(str(HH_PAIRS))[:n + 4])[:n]
    # pad == eos: a response ending in eos is read at its last non-pad token, as padded
    pairs[0] = dict(pairs[0], chosen_ids=pairs[0]["chosen_ids"][:-2] + [tok.pad_token_id] * 2)
    return pairs


def reward_model(arch, tok, pooling, attn="sdpa"):
    from transformers import LlamaForSequenceClassification
    torch.manual_seed(0)
    config = llama_config(arch, tok, attn)
    config.num_labels = 1
    model = RewardModel(LlamaForSequenceClassification(config), pooling=pooling).eval()
    with torch.no_grad():  # a head that is not ~0, so differences in its input show; rewards O(1), as 1e-5 assumes
        model.hf.score.weight.normal_(0, 2.0 / config.hidden_size ** 0.5)
    return model


def rm_outputs(model, pairs, pad_id, shared=None):
    """rewards, embeddings, APLOT margins, the APLOT loss and gradients of one step: padded, or `shared`
    (a collate_pairs_shared batch)."""
    model.zero_grad()
    if shared is None:
        b = collate_pairs(pairs, pad_id)
        rewards, emb = model(b["input_ids"], b["attention_mask"], b["response_start"])
    else:
        rewards, emb = model(packed=shared["packed"])
    B = len(pairs)
    margin = sinkhorn_margin(rewards[:B].detach(), rewards[B:].detach(), emb[:B], emb[B:], backend="torch")
    loss = bt_loss(rewards[:B], rewards[B:], margin, 0.0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return rewards.detach(), emb, margin, loss.detach(), grads


@pytest.mark.parametrize("arch,pooling,attn", [("llama", "token", "sdpa"), ("llama", "mean", "sdpa"),
                                               ("gqa_llama", "token", "sdpa"), ("smollm2", "mean", "sdpa"),
                                               ("llama", "mean", "eager"), ("gqa_llama", "token", "aplot_varlen_sdpa")])
def test_shared_rm_equals_padded(arch, pooling, attn, smol_tok):
    if attn == packing.VARLEN_SDPA:  # what train_rm --packing --share_prompt runs: varlen_sdpa with a dense mask
        packing.register_varlen_sdpa()
    model = reward_model(arch, smol_tok, pooling, attn)
    pairs = encoded_pairs(smol_tok)
    pad = smol_tok.pad_token_id
    shared = collate_pairs_shared(pairs, pad, capacity=256)
    assert shared["packed"]["n_tokens"] < sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    padded = rm_outputs(model, pairs, pad)
    assert padded[2].abs().max() > 1e-3  # real APLOT margins, not zeros
    diff = worst(padded, rm_outputs(model, pairs, pad, shared))
    assert diff < ATOL, diff
    # the failure this guards against: chosen and rejected seeing each other changes the rewards
    leaky = dict(shared["packed"], branch=shared["packed"]["branch"].clamp(max=0))
    with torch.no_grad():
        r_leak, _ = model(packed=leaky)
    assert (r_leak - padded[0]).abs().max() > 1e-3


def test_a_prompt_with_many_pairs_is_split_and_still_equals_padded(smol_tok):
    """Six pairs of one prompt beside one-pair prompts (OASST-style data, several ranked answers per prompt):
    laid out as one group, that prompt's row would be the batch's widest and every row padded to it. Split into
    runs of at most max(capacity, a prompt with its two longest answers), the rows stay narrow, and rewards,
    embeddings, margins, loss and gradients still equal the padded forward's."""
    from aplot_rlhf.data.collate import collate_shared
    model = reward_model("llama", smol_tok, "mean")
    pad = smol_tok.pad_token_id
    base = encoded_pairs(smol_tok, n=9, max_length=96)
    prompt = base[0]["chosen_ids"][:base[0]["chosen_start"]]

    def answer(ids, start):
        return ids[start:][:12] or [7]
    many = [dict(p, chosen_ids=prompt + answer(p["chosen_ids"], p["chosen_start"]), chosen_start=len(prompt),
                 rejected_ids=prompt + answer(p["rejected_ids"], p["rejected_start"]), rejected_start=len(prompt))
            for p in base[:6]]
    pairs = many + base[6:]
    capacity = 96
    shared = collate_pairs_shared(pairs, pad, capacity)
    seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    starts = [p["chosen_start"] for p in pairs] + [p["rejected_start"] for p in pairs]
    whole = collate_shared(seqs, starts, pad, None)  # no capacity: nothing is split, one row
    widest_pair = max(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    assert shared["packed"]["input_ids"].shape[1] <= max(capacity, widest_pair)
    assert whole["input_ids"].shape[1] > 2 * max(capacity, widest_pair)  # what one group of 12 would have been
    assert shared["packed"]["n_tokens"] < sum(len(s) for s in seqs)  # still shared: runs of the six keep the prompt
    diff = worst(rm_outputs(model, pairs, pad), rm_outputs(model, pairs, pad, shared))
    assert diff < ATOL, diff


def test_only_a_group_wider_than_a_row_and_a_pair_is_split():
    """One pair per prompt keeps its layout (a run holds at least two sequences); a prompt with four pairs among
    lone pairs is cut into runs of the widest pair's width; capacity None splits nothing."""
    from aplot_rlhf.models.packing import split_wide_groups
    pairs = [[0, 3], [1, 4], [2, 5]]
    assert split_wide_groups(pairs, [70, 10, 0], [[60, 90], [5, 5], [80, 80]], capacity=100) == pairs
    # 8 sequences of 40 tokens after a 20-token prompt (width 340) beside pairs of width 100, rows of 64
    mixed = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11], [12, 13]]
    lens = [[40] * 8, [25, 25], [25, 25], [25, 25]]
    assert split_wide_groups(mixed, [20, 50, 50, 50], lens, capacity=64) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9],
                                                                            [10, 11], [12, 13]]
    assert split_wide_groups(mixed, [20, 50, 50, 50], lens, capacity=200) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9],
                                                                             [10, 11], [12, 13]]
    assert split_wide_groups(mixed, [20, 50, 50, 50], lens, capacity=None) == mixed


def test_shared_prefix_is_the_prompt_and_keeps_a_token_each():
    from aplot_rlhf.data.collate import collate_shared
    # 0 and 1 share the prompt [1, 2, 3] (token 4 begins both responses but is not shared); 2 is cut differently
    seqs, starts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [2, 3, 7]], [3, 3, 2]
    layout = collate_shared(seqs, starts, pad_id=0, capacity=None)
    assert layout["input_ids"].tolist() == [[1, 2, 3, 4, 5, 4, 6, 2, 3, 7]]
    assert layout["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 0, 1, 2]]
    assert layout["reward_index"].tolist() == [4, 6, 9]
    assert layout["pool_segment"].tolist() == [-1, -1, -1, 0, 0, 1, 1, -1, -1, 2]
    # a response of a single pad token (pad == eos): its reward is read at the prompt's last token, shared
    one = collate_shared([[1, 2, 3, 0], [1, 2, 3, 9]], [3, 3], pad_id=0, capacity=None)
    assert one["input_ids"].tolist() == [[1, 2, 3, 0, 9]] and one["reward_index"].tolist() == [2, 4]
    # a sequence that is all prompt keeps its last token as its own
    whole = collate_shared([[1, 2, 3], [1, 2, 3, 9]], [3, 3], pad_id=0, capacity=None)
    assert whole["input_ids"].tolist() == [[1, 2, 3, 3, 9]] and whole["reward_index"].tolist() == [2, 4]


def test_encoders_are_refused_and_flash_attention_falls_back(minilm_path, smol_tok):
    from aplot_rlhf.models.loader import load_tokenizer
    from aplot_rlhf.models.reward import load_reward_model
    encoder = load_reward_model(minilm_path, tokenizer=load_tokenizer("reward", minilm_path))
    with pytest.raises(ConfigError, match="encoder"):
        encoder.shared_prompt_support()
    decoder = reward_model("llama", smol_tok, "token")
    assert decoder.shared_prompt_support() is None
    decoder.hf.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in decoder.shared_prompt_support()


@pytest.mark.slow  # FlexAttention compiles its kernel (~20 s on one CPU core)
def test_flex_block_mask_equals_the_dense_mask(smol_tok):
    """FlexAttention's block mask (the GPU path) on CPU, forward only (torch has no CPU flex backward)."""
    tokens, mask = ppo_case(smol_tok)
    pad = smol_tok.pad_token_id
    out = {}
    for attn in ("sdpa", "flex_attention"):
        actor, critic = actor_and_critic("gqa_llama", smol_tok, attn)
        layout = Layout.build("shared", PROMPTS, RESPONSES, pad, T, "cpu", capacity=None)
        with torch.no_grad():
            out[attn] = logprobs_on(actor, layout, tokens) * mask, values_on(critic, layout) * mask
    for a, b in zip(out["sdpa"], out["flex_attention"]):
        assert (a - b).abs().max() < ATOL
