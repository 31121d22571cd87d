"""benchmarks/peer_grpo.py's TRL reward function gives the score our PPO reward adapter gives (issue 24 item 5).

The benchmark hands TRL's GRPOTrainer `OurRewardModelScore`, a plain Python reward function, and refuses to start
when it disagrees with ours on fixed pairs; this checks the same equality on tiny reward models, in our venv (the
function needs only transformers and aplot_rlhf's data modules): a decoder trained on chat, a BERT on text, and
statistics small enough that the clip at +-10 acts. TRL itself is not imported here.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from helpers import REPO


@pytest.fixture(scope="module")
def peer_grpo():
    saved = list(sys.path)  # the module puts benchmarks/ on sys.path to import peer_trl; not for the other tests
    spec = importlib.util.spec_from_file_location("peer_grpo", REPO / "benchmarks" / "peer_grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path[:] = saved
    return module


def export_rm(base: str, out: str, input_format: str, mean: float, std: float) -> str:
    """A reward model as train_rm exports one (engine.export with the export contract); an untrained head."""
    from aplot_rlhf.config import RMConfig
    from aplot_rlhf.data.export_contract import rm_export_fields
    from aplot_rlhf.engine.export import export_pretrained
    from aplot_rlhf.models.loader import load_model, load_tokenizer
    torch.manual_seed(0)
    model = load_model("reward", base)
    tok = load_tokenizer("reward", base)
    if model.config.pad_token_id is None:  # as train_rm sets it
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    export_pretrained(model, tok, out, rm_export_fields(RMConfig(model_name_or_path=base, max_length=96, loss="bt"),
                                                       input_format, mean, std))
    return out


@pytest.mark.parametrize("kind,input_format,mean,std", [
    ("llama", "chat", 0.3, 1.7),
    ("minilm", "text", 0.1, 0.4),
    ("llama", "text", 0.0, 1e-3),  # scores far past +-10 after normalizing: the clip decides
])
def test_trl_reward_function_matches_ours(peer_grpo, tiny_llama_dir, minilm_path, tmp_path, kind, input_format, mean,
                                          std):
    from aplot_rlhf.rewards import ModelReward, normalize_scores
    path = export_rm(tiny_llama_dir if kind == "llama" else minilm_path, str(tmp_path / "rm"), input_format, mean, std)
    prompts, texts = peer_grpo.check_pairs()  # shipped transcripts, an empty answer, one past the window
    ours = ModelReward(path, {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}, torch.float32, 4)
    raw = ours(prompts, texts)
    final = normalize_scores(raw, ours.mean, ours.std).clamp(-peer_grpo.REWARD_CLIP, peer_grpo.REWARD_CLIP)
    theirs = peer_grpo.OurRewardModelScore(path, batch_size=4)
    trl_raw = theirs.raw_scores(prompts, texts)
    assert torch.allclose(torch.tensor(trl_raw), raw, atol=1e-5, rtol=0)
    # called as TRL calls it: completions decoded, the prompt column among the keyword arguments
    trl_final = theirs(prompts=["unused"] * len(texts), completions=texts, rm_prompt=prompts, trainer_state=None)
    assert torch.allclose(torch.tensor(trl_final), final, atol=1e-5, rtol=0)
    if std < 0.01:
        assert final.abs().max().item() == peer_grpo.REWARD_CLIP  # the clip acted on both sides
    assert theirs.calls[-1]["mean"] == pytest.approx(final.mean().item(), abs=1e-5)
