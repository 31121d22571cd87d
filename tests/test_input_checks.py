"""Issue 23, items 7, 9 and 10: inputs that gave a silent wrong result, and messages a user cannot act on.

Each test here failed on the code before its fix (the failure is quoted in the commit that added it).
"""
import json
import logging
from pathlib import Path

import pytest

from helpers import REPO

SHAPES = REPO / "ds_configs" / "model_shapes"


def _rm_cfg(**kw):
    from aplot_rlhf.config import RMConfig
    return RMConfig(model_name_or_path=str(SHAPES / "llama3-8b"), **kw).validate()


# ------------------------------------------------------------------ 7: duplicate pairs and the held-out split

def _pairs_with_copies(path: Path, copies: int = 40, distinct: int = 60) -> Path:
    rows = [{"prompt": f"question {i}?", "chosen": f"a good answer {i}", "rejected": f"no {i}"}
            for i in range(distinct)]
    dup = {"prompt": "the same question?", "chosen": "the same good answer", "rejected": "the same bad answer"}
    for k in range(copies):  # spread through the file, as a scrape or a merge of two dumps leaves them
        rows.insert(1 + k * distinct // copies, dict(dup))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _content(p):
    return json.dumps([p["prompt"], p["chosen"], p["rejected"]])


@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_duplicate_pairs_never_straddle_the_split_and_are_counted(tmp_path, caplog, mode):
    from aplot_rlhf.data.sets import load_rm_data
    data = _pairs_with_copies(tmp_path / "train.jsonl")
    cfg = _rm_cfg(train_data=[str(data)], eval_split_fraction=0.3, duplicate_pairs=mode)
    report = {}
    with caplog.at_level(logging.WARNING):
        train, evals = load_rm_data(cfg, None, report)
    val = evals["id_val"]
    assert not {_content(p) for p in train} & {_content(p) for p in val}, "a pair is in both train and id_val"
    copies = sum(_content(p).startswith('["the same question?"') for p in train + val)
    assert copies == (1 if mode == "drop" else 40)
    assert len(train) + len(val) == (61 if mode == "drop" else 100)
    reason = next(r for r in report["train_data"]["skipped"] if "duplicate" in r)
    assert report["train_data"]["skipped"][reason] == 39
    assert sum("39 duplicate" in r.getMessage() for r in caplog.records) == 1, caplog.text


def test_a_file_without_duplicates_keeps_its_split():
    """The split groups duplicates, and a file without any splits exactly as before (earlier id_val results stay
    comparable): the seeded shuffle of indices, the first round(n * fraction) held out."""
    import random

    from aplot_rlhf.data.pairs import split_pairs
    pairs = [{"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}", "strength": None, "origin": f"f:{i}"}
             for i in range(50)]
    order = list(range(50))
    random.Random(7).shuffle(order)
    val_idx = set(order[:5])
    train, val = split_pairs(pairs, 0.1, 7)
    assert [p["origin"] for p in val] == [f"f:{i}" for i in range(50) if i in val_idx]
    assert [p["origin"] for p in train] == [f"f:{i}" for i in range(50) if i not in val_idx]


# ------------------------------------------------------------------ 10g: one warning per skip

def test_a_skip_is_warned_once_when_loading_and_tokenizing_share_a_counter(minilm_path, tmp_path, caplog):
    from transformers import AutoTokenizer

    from aplot_rlhf.data.pair_tokenizer import PairTokenizer
    from aplot_rlhf.data.sets import load_rm_data
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": "bad"} for i in range(8)]
    rows.append({"prompt": "q", "chosen": "  ", "rejected": "bad"})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoder = PairTokenizer(AutoTokenizer.from_pretrained(minilm_path), 64, "auto", " ", "keep_end")
    with caplog.at_level(logging.WARNING):
        load_rm_data(_rm_cfg(train_data=[str(data)]), encoder, {})
    warned = [r.getMessage() for r in caplog.records if "empty 'chosen'" in r.getMessage()]
    assert warned == ["train_data: 1 pair(s) skipped: empty 'chosen' response"], warned


# ------------------------------------------------------------------ 9: an embedding padded beyond the tokenizer

from test_ppo_correctness import first_rollout, ppo_config, prompt_file, trainer_factory  # noqa: E402,F401


@pytest.mark.parametrize("packing", [False, True])
def test_padded_vocabulary_rows_enter_no_log_prob_and_are_never_sampled(char_llama_dir, prompt_file,  # noqa: F811
                                                                       tmp_path, trainer_factory,  # noqa: F811
                                                                       packing):
    """The character Llama has 64 embedding rows for 43 tokens (padded, as real checkpoints pad to a multiple
    of 64/128). A reference that differs from the actor only in the padded rows' output embeddings is the same
    policy over the tokenizer's tokens: KL exactly 0, and both log-probs are those of the unpadded model."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from aplot_rlhf.trainers.ppo_layout import pad_prompt_response, response_logprobs, trim_left_padding
    n_tok = len(AutoTokenizer.from_pretrained(char_llama_dir))
    model = LlamaForCausalLM.from_pretrained(char_llama_dir)
    assert model.config.vocab_size > n_tok
    ref_dir = tmp_path / "ref"
    with torch.no_grad():
        model.lm_head.weight[n_tok:] += 3.0 * torch.randn_like(model.lm_head.weight[n_tok:])
    model.save_pretrained(ref_dir)
    AutoTokenizer.from_pretrained(char_llama_dir).save_pretrained(ref_dir)
    unpadded = LlamaForCausalLM.from_pretrained(char_llama_dir)
    unpadded.resize_token_embeddings(n_tok)
    unpadded.eval()

    trainer = trainer_factory(ppo_config(char_llama_dir, prompt_file, tmp_path / "run", reference_model=str(ref_dir),
                                         packing=packing))
    exp = first_rollout(trainer)
    sampled = [t for r in exp["responses"] for t in r]
    assert sampled and max(sampled) < n_tok, f"a padded id was sampled: {sorted(set(sampled))}"
    assert exp["kl_seq"].abs().max().item() == 0.0, f"KL at iteration 1: {exp['kl_seq'].tolist()}"
    ids, attn, posids, tokens, mask = pad_prompt_response(exp["prompts"], exp["responses"], trainer.tok.pad_token_id)
    with torch.no_grad():
        want = response_logprobs(unpadded, *trim_left_padding(ids, attn, posids), tokens, temperature=1.0)
    torch.testing.assert_close(exp["old_lp"].cpu() * mask, want * mask, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ 10: messages a user can act on

def test_too_few_prompts_names_prompts_and_their_flags(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from aplot_rlhf.cli import train_ppo
    for key in ("APLOT_PLAN_NODES", "APLOT_PLAN_GPUS_PER_NODE", "APLOT_PLAN_GPU_MEM_GIB", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(5)))
    with pytest.raises(SystemExit) as exc:
        train_ppo.main(["--actor_model", tiny_llama_dir, "--reward_model", "rule:neg_length", "--prompt_data",
                        str(prompts), "--rollout_batch_size", "4", "--ppo_mini_batch_size", "4", "--micro_batch_size",
                        "2", "--eval_prompts", "2", "--dry_run"])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "3 training prompts (5 read, 2 held out by --eval_prompts)" in err and "--rollout_batch_size 4" in err, err
    assert "pairs" not in err and "micro-batch" not in err, err


def test_plan_names_the_flag_that_must_be_at_least_one(capsys):
    from aplot_rlhf.cli import plan
    with pytest.raises(SystemExit) as exc:
        plan.main(["--model", "llama3-8b", "--micro-batch", "0"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error: --micro-batch must be >= 1, got 0" in err, err


def _tokenizer(symbols):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(symbols)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def test_vocabulary_mismatch_counts_what_it_says():
    """Lower-case letters against upper-case ones: 52 token strings differ over the union, 29 tokens each; the
    message said '52 of 29 tokens map to different ids'."""
    from transformers import LlamaConfig

    from aplot_rlhf.models.policy import check_same_vocabulary
    lower, upper = _tokenizer("abcdefghijklmnopqrstuvwxyz"), _tokenizer("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    config = LlamaConfig(vocab_size=64)
    with pytest.raises(ValueError) as exc:
        check_same_vocabulary(lower, upper, config, config)
    message = str(exc.value)
    assert "52 of 29" not in message, message
    assert "actor 29 tokens, reference 29; 52 token strings have a different id or exist in only one" in message


def test_help_of_eval_rm_and_plan_has_no_none_default(capsys):
    from aplot_rlhf.cli import eval_rm, plan
    for main in (eval_rm.main, plan.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--model" in out and "(default: None)" not in out, out
        if main is plan.main:
            assert "(default: 1)" in out  # real defaults still shown


@pytest.mark.parametrize("where", ["pairs", "pairs_conversation", "prompts"])
def test_a_chat_message_without_role_names_file_line_field_and_role(tmp_path, where):
    from aplot_rlhf.data.pairs import load_pairs
    from aplot_rlhf.data.prompts import load_prompts
    from aplot_rlhf.data.reading import DataError
    good = [{"role": "user", "content": "hi"}]
    bad = [{"role": "user", "content": "hi"}, {"content": "hello"}]  # the second message lacks its role
    path = tmp_path / "data.jsonl"
    if where == "prompts":
        rows, key = [{"prompt": good}, {"prompt": bad}], "prompt"
    elif where == "pairs":
        rows, key = [{"prompt": good, "chosen": "a", "rejected": "b"},
                     {"prompt": good, "chosen": bad[1:], "rejected": "b"}], "chosen"
    else:  # full conversations, the prompt being their shared prefix
        rows, key = [{"chosen": good + [{"role": "assistant", "content": "a"}], "rejected": bad}], "rejected"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as exc:
        load_prompts([str(path)]) if where == "prompts" else load_pairs(str(path))
    line = 1 if where == "pairs_conversation" else 2
    assert f"{path}:{line}: field {key!r}: message" in str(exc.value) and "no 'role'" in str(exc.value), exc.value


def test_a_prompt_message_without_string_content_is_a_data_error(tmp_path):
    from aplot_rlhf.data.prompts import load_prompts
    from aplot_rlhf.data.reading import DataError
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": None}]}) + "\n")
    with pytest.raises(DataError, match=r"prompts\.jsonl:1: field 'prompt': message 0 has NoneType content"):
        load_prompts([str(path)])


def test_a_group_run_without_reward_signal_says_so(char_llama_dir, prompt_file, tmp_path, trainer_factory,  # noqa: F811
                                                   caplog):
    """GRPO with a reward no response can change ('Z' never appears in the character vocabulary): every group is
    uniform, nothing trains. One warning per iteration, and one at the end for the whole run."""
    cfg = ppo_config(char_llama_dir, prompt_file, tmp_path, reward_model="rule:char_frac:Z", advantage_estimator="grpo",
                     samples_per_prompt=2, ppo_mini_batch_size=8, micro_batch_size=4, ppo_iterations=2)
    trainer = trainer_factory(cfg)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    per_iteration = [m for m in warned if "reward/uniform_group_frac = 1" in m]
    assert len(per_iteration) == 2 and "iteration 1:" in per_iteration[0] and "grpo" in per_iteration[0], warned
    assert sum("no iteration of this run" in m for m in warned) == 1, warned


def test_no_progress_silences_transformers_progress_bars(char_llama_dir, prompt_file, tmp_path,  # noqa: F811
                                                         trainer_factory, capfd):  # noqa: F811
    from transformers.utils import logging as hf_logging

    from aplot_rlhf.engine import export as hf_export
    try:
        trainer = trainer_factory(ppo_config(char_llama_dir, prompt_file, tmp_path / "run"))  # --no-progress
        capfd.readouterr()
        hf_export.export_pretrained(trainer.actor.module, trainer.tok, str(tmp_path / "policy"))
        err = capfd.readouterr().err
        assert "Writing model shards" not in err and not hf_logging.is_progress_bar_enabled(), err
    finally:
        hf_logging.enable_progress_bar()


def test_the_dry_run_reports_the_duplicates(tmp_path, monkeypatch, capsys):
    from test_inputs import rm_dry_run
    data = _pairs_with_copies(tmp_path / "train.jsonl")
    code, out, err = rm_dry_run(["--model_name_or_path", str(SHAPES / "llama3-8b"), "--train_data", str(data),
                                 "--eval_split_fraction", "0.2", "--micro_batch_size", "2"], monkeypatch, capsys)
    assert code in (0, 1), (code, err[-2000:])  # 1 = the plan does not fit; the data part is what counts here
    report = json.loads(out.split("data (as training reads it):\n", 1)[1].split("\n}\n", 1)[0] + "\n}")
    skipped = report["train_data"]["skipped"]
    assert [n for r, n in skipped.items() if r.startswith("duplicate pair(s) dropped")] == [39], report
    assert report["train_data"]["pairs"] + report["id_val"]["pairs"] == 61, report
