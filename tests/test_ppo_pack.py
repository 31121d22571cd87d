"""The packed PPO batch scores each response exactly as an unpadded forward of that one sequence does."""
import torch
from torch import nn

from aplot_rlhf.models.policy import Critic
from aplot_rlhf.trainers.ppo_layout import pad_prompt_response, response_logprobs, response_values, trim_left_padding
from aplot_rlhf.trainers.ppo_math import logprobs_of


def _model(char_llama_dir):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(char_llama_dir, dtype=torch.float32).eval()


# prompts of different lengths, responses of different lengths (one empty: a response that was only EOS-cut)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]
RESPONSES = [[20, 21, 22], [23, 24, 25, 26, 27], [], [28]]


def test_pack_layout():
    ids, attn, posids, tokens, mask = pad_prompt_response(PROMPTS, RESPONSES, pad_id=2)
    assert ids.shape == (4, 7 + 5) and tokens.shape == (4, 5)
    # row 1: 5 columns of left padding, the prompt ends at column 6, the response follows from column 7
    assert ids[1].tolist() == [2] * 5 + [12, 13, 23, 24, 25, 26, 27]
    assert attn[1].tolist() == [0] * 5 + [1] * 7
    assert posids[1, 5:].tolist() == list(range(7))  # positions start at the first real token
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5, [0] * 5, [1, 0, 0, 0, 0]]
    trimmed = trim_left_padding(ids[2:], attn[2:], posids[2:])  # rows 2-3: longest prompt 4 -> 3 columns cut
    assert trimmed[0].shape[1] == ids.shape[1] - 3 and trimmed[1][:, 0].any()


def test_packed_logprobs_and_values_equal_unpadded_forwards(char_llama_dir):
    model = _model(char_llama_dir)
    torch.manual_seed(1)
    critic = Critic(model.model, nn.Linear(model.config.hidden_size, 1)).eval()
    ids, attn, posids, tokens, mask = pad_prompt_response(PROMPTS, RESPONSES, pad_id=2)
    with torch.no_grad():
        seqs = trim_left_padding(ids, attn, posids)
        lp, ent = response_logprobs(model, *seqs, tokens, with_entropy=True)
        values = response_values(critic, *seqs, tokens.shape[1])
        assert lp.shape == ent.shape == values.shape == tokens.shape
        for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
            seq = torch.tensor([p + r])
            logits = model(input_ids=seq).logits[0, len(p) - 1:len(p) - 1 + len(r)]
            want = logprobs_of(logits[None], torch.tensor([r]))[0] if r else torch.zeros(0)
            torch.testing.assert_close(lp[i, :len(r)], want, atol=1e-5, rtol=1e-5)
            want_v = critic(seq, torch.ones_like(seq))[0, len(p) - 1:len(p) - 1 + len(r)]
            torch.testing.assert_close(values[i, :len(r)], want_v, atol=1e-5, rtol=1e-5)
        # the projection really was limited to the response columns, and the full-logits path agrees
        full = model(input_ids=seqs[0], attention_mask=seqs[1], position_ids=seqs[2]).logits[:, -tokens.shape[1] - 1:-1]
        torch.testing.assert_close(lp * mask, logprobs_of(full, tokens) * mask, atol=1e-5, rtol=1e-5)
