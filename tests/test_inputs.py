"""Inputs that are wrong but look fine, and messages a user can act on (issue 16, items 6-13).

Each test here failed on the code before its fix: an untrained score head used for scoring, colliding
eval-set names, max_length beyond the model's positions, a reference with another tokenizer, a dry run
that did not read the data, numeric knobs checked only by torch, --help hiding defaults, tracebacks
for user errors. (User errors are ValueErrors too: DataError, ConfigError, ModelError; the tests match those.)
"""
import json
import re
import subprocess
from pathlib import Path

import pytest

from helpers import CHARS, PYTHON, REPO, python_env

SHAPES = REPO / "ds_configs" / "model_shapes"
DEMO_PAIRS = REPO / "aplot_rlhf" / "demo_data" / "hh-rlhf" / "harmless-base-test.pairs.jsonl"


def write_pairs(path: Path, n: int = 8, bad_line: str | None = None) -> Path:
    rows = [json.dumps({"prompt": f"question {i}?", "chosen": f"a good answer {i}", "rejected": "no"})
            for i in range(n)]
    if bad_line is not None:
        rows.insert(1, bad_line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def minilm_rm_dir(minilm_path, tmp_path_factory) -> str:
    """MiniLM with a score head saved in its checkpoint: what train_rm exports, without the training."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=1)
    out = tmp_path_factory.mktemp("minilm_rm")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(out)
    return str(out)


# ------------------------------------------------------------------ 6: untrained score head

def test_eval_rm_refuses_a_base_model_without_a_trained_head(minilm_path, tmp_path):
    from aplot_rlhf.cli import eval_rm
    data = write_pairs(tmp_path / "pairs.jsonl")
    with pytest.raises(ValueError, match=r"no trained score head \(classifier.bias, classifier.weight newly "
                                        r"initialized.*--allow_untrained_reward_head"):
        eval_rm.main(["--model", minilm_path, "--data", str(data)])
    out = eval_rm.main(["--model", minilm_path, "--data", str(data), "--allow_untrained_reward_head"])
    assert out["pairs"]["n"] == 8


def test_a_saved_head_loads_and_train_rm_may_start_from_a_base_model(minilm_path, minilm_rm_dir, tmp_path):
    from transformers import AutoTokenizer

    from aplot_rlhf.cli import eval_rm
    from aplot_rlhf.models.reward import load_reward_model
    out = eval_rm.main(["--model", minilm_rm_dir, "--data", str(write_pairs(tmp_path / "pairs.jsonl"))])
    assert out["pairs"]["n"] == 8
    # train_rm's own loader starts from the base model with a fresh head, on purpose
    load_reward_model(minilm_path, tokenizer=AutoTokenizer.from_pretrained(minilm_path))


def test_ppo_reward_model_and_critic_refuse_an_untrained_head(tiny_llama_dir, tmp_path):
    """A causal-LM folder passed as --reward_model: score.weight is not in it."""
    import torch
    from transformers import LlamaForSequenceClassification

    from aplot_rlhf.models.policy import load_critic
    from aplot_rlhf.rewards import ModelReward
    frozen = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}
    with pytest.raises(ValueError, match=r"reward model .*no trained score head \(score.weight newly initialized"):
        ModelReward(tiny_llama_dir, frozen, torch.float32, 4)
    with pytest.raises(ValueError, match=r"critic_init 'reward'.*score.weight newly initialized"):
        load_critic("reward", reward_path=tiny_llama_dir, actor_path=tiny_llama_dir)
    ModelReward(tiny_llama_dir, frozen, torch.float32, 4, allow_untrained_head=True)  # the override works
    trained = tmp_path / "rm"  # a folder with its head saved loads silently in both places
    LlamaForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1).save_pretrained(trained)
    for f in Path(tiny_llama_dir).glob("tokenizer*"):
        (trained / f.name).write_bytes(f.read_bytes())
    ModelReward(str(trained), frozen, torch.float32, 4)
    load_critic("reward", reward_path=str(trained), actor_path=tiny_llama_dir)


# ------------------------------------------------------------------ 7: eval-set names

def test_eval_names_are_unique():
    from aplot_rlhf.data.pairs import parse_eval_specs
    with pytest.raises(ValueError, match="the name 'hhh' is given twice"):
        parse_eval_specs(["hhh=a/x.jsonl", "hhh=b/y.jsonl"])
    with pytest.raises(ValueError, match="'id_val' is taken by the held-out split"):
        parse_eval_specs(["id_val=a/x.jsonl"], reserved=("id_val",))
    got = parse_eval_specs(["a/test.jsonl", "b/test.jsonl", "test=c/other.jsonl", "a/test.jsonl", "d/solo.jsonl"])
    names = [n for n, _ in got]
    assert len(set(names)) == len(names) == 5
    assert names == ["a_test", "b_test", "test", "a_test-2", "solo"]


def test_explicit_name_clash_is_refused_by_the_config():
    from aplot_rlhf.config import RMConfig, load_config
    with pytest.raises(ValueError, match="the name 'hhh' is given twice"):
        load_config(RMConfig, ["--model_name_or_path", "m", "--train_data", "t.jsonl",
                               "--eval_data", "hhh=a.jsonl", "hhh=b.jsonl"])


def test_eval_rm_reports_one_entry_per_input(minilm_rm_dir, tmp_path, capsys):
    from aplot_rlhf.cli import eval_rm
    a = write_pairs(tmp_path / "a" / "test.jsonl", n=4)
    b = write_pairs(tmp_path / "b" / "test.jsonl", n=6)
    out = eval_rm.main(["--model", minilm_rm_dir, "--data", str(a), "--data", str(b)])
    assert {k: v["n"] for k, v in out.items()} == {"a_test": 4, "b_test": 6}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]).keys() == {"a_test", "b_test"}


# ------------------------------------------------------------------ 8: max_length vs positions

@pytest.mark.slow  # a whole training run in a subprocess
def test_train_rm_refuses_max_length_beyond_the_models_positions_at_start_up(minilm_path, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    proc = subprocess.run([PYTHON, "-m", "aplot_rlhf.cli.train_rm", "--model_name_or_path", minilm_path,
                           "--train_data", str(data), "--output_dir", str(out), "--max_length", "1024",
                           "--max_steps", "1", "--micro_batch_size", "2", "--zero_stage", "0", "--no-progress",
                           "--no-tensorboard"], env=python_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(r"--max_length 1024 is more than the model .* can take: 512 tokens "
                     r"\(max_position_embeddings=512 in the model's config\)", proc.stderr), proc.stderr[-3000:]
    assert not (out / "checkpoints").exists()  # refused before any step


def test_eval_rm_and_ppo_check_lengths_too(minilm_rm_dir, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from aplot_rlhf.cli import eval_rm
    with pytest.raises(ValueError, match="--max_length 600 is more than the model .*: 512 tokens"):
        eval_rm.main(["--model", minilm_rm_dir, "--data", str(write_pairs(tmp_path / "p.jsonl")),
                      "--max_length", "600"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(20)))
    code, _, err = ppo_dry_run(tiny_llama_dir, prompts, monkeypatch, capsys, "--max_prompt_length", "500",
                               "--max_new_tokens", "64")
    assert code == 2 and "--max_prompt_length + --max_new_tokens 564 is more than the actor" in err
    assert "512 tokens (max_position_embeddings=512" in err
    # a shape-only folder (config.json, no tokenizer) is checked against its config
    code, _, err = rm_dry_run(["--model_name_or_path", str(SHAPES / "llama3-8b"), "--train_data", str(DEMO_PAIRS),
                               "--max_length", "16384"], monkeypatch, capsys)
    assert code == 2 and "--max_length 16384 is more than the model" in err and "max_position_embeddings=8192" in err


# ------------------------------------------------------------------ 9: reference tokenizer

def _char_tokenizer(chars: str):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def test_reference_tokenizer_is_compared_not_only_its_size(char_llama_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig

    from aplot_rlhf.config import PPOConfig
    from aplot_rlhf.models.policy import check_same_vocabulary, reference_tokenizer
    actor_tok = AutoTokenizer.from_pretrained(char_llama_dir)
    actor_cfg = LlamaConfig.from_pretrained(char_llama_dir)
    # same size, other ids: a reversed alphabet (what a different model family's tokenizer looks like to the KL)
    other = tmp_path / "other_ref"
    _char_tokenizer(CHARS[::-1]).save_pretrained(other)
    actor_cfg.save_pretrained(other)
    cfg = PPOConfig(actor_model=char_llama_dir, reference_model=str(other), reward_model="rule:neg_length",
                    prompt_data=["x"])
    ref_tok = reference_tokenizer(cfg, actor_tok)
    assert len(ref_tok) == len(actor_tok) and ref_tok is not actor_tok
    with pytest.raises(ValueError, match=r"reference model's tokenizer is not the actor's \(actor \d+ tokens, "
                                         r"reference \d+; \d+ token strings"):
        check_same_vocabulary(actor_tok, ref_tok, actor_cfg, LlamaConfig.from_pretrained(other))
    # the same tokenizer with a padded embedding matrix (64 -> 128 rows) is fine
    padded = LlamaConfig.from_pretrained(char_llama_dir)
    padded.vocab_size = 128
    same = tmp_path / "same_ref"
    actor_tok.save_pretrained(same)
    cfg.reference_model = str(same)
    check_same_vocabulary(actor_tok, reference_tokenizer(cfg, actor_tok), actor_cfg, padded)
    cfg.reference_model = ""
    assert reference_tokenizer(cfg, actor_tok) is actor_tok
    small = LlamaConfig.from_pretrained(char_llama_dir)
    small.vocab_size = len(actor_tok) - 1
    with pytest.raises(ValueError, match="embedding has .* rows but its tokenizer has"):
        check_same_vocabulary(actor_tok, actor_tok, actor_cfg, small)


# ------------------------------------------------------------------ 10: the dry run reads the data

def rm_dry_run(argv, monkeypatch, capsys):
    from aplot_rlhf.cli import train_rm
    for key in ("APLOT_PLAN_NODES", "APLOT_PLAN_GPUS_PER_NODE", "APLOT_PLAN_GPU_MEM_GIB", "APLOT_PLAN_CPU_MEM_GIB",
                "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    try:
        train_rm.main([*argv, "--dry_run"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def ppo_dry_run(actor, prompts, monkeypatch, capsys, *extra):
    from aplot_rlhf.cli import train_ppo
    for key in ("APLOT_PLAN_NODES", "APLOT_PLAN_GPUS_PER_NODE", "APLOT_PLAN_GPU_MEM_GIB", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    try:
        train_ppo.main(["--actor_model", str(actor), "--reward_model", "rule:neg_length", "--prompt_data", str(prompts),
                        "--rollout_batch_size", "4", "--ppo_mini_batch_size", "4", "--micro_batch_size", "2",
                        "--eval_prompts", "2", *extra, "--dry_run"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("bad_line,expected", [
    ('{"prompt": "p", "chosen": "a"', r"train\.jsonl:2: malformed JSON"),
    ('{"prompt": "p", "chosen": "a", "answer": "b"}', r"train\.jsonl:2: missing field 'rejected'"),
])
def test_rm_dry_run_rejects_data_training_would_reject(tmp_path, monkeypatch, capsys, bad_line, expected):
    data = write_pairs(tmp_path / "train.jsonl", bad_line=bad_line)
    code, _, err = rm_dry_run(["--model_name_or_path", str(SHAPES / "llama3-8b"), "--train_data", str(data)],
                              monkeypatch, capsys)
    assert code == 2 and re.search("dry run failed: .*" + expected, err), err
    # eval files are read too
    code, _, err = rm_dry_run(["--model_name_or_path", str(SHAPES / "llama3-8b"), "--train_data", str(DEMO_PAIRS),
                               "--micro_batch_size", "1", "--eval_data", f"mine={data}"], monkeypatch, capsys)
    assert code == 2 and re.search(expected, err), err


def test_rm_dry_run_reports_counts_and_skips_as_training_would(minilm_path, tmp_path, monkeypatch, capsys):
    data = write_pairs(tmp_path / "train.jsonl", n=8,
                       bad_line=json.dumps({"prompt": "p", "chosen": " ", "rejected": "x"}))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 200, "chosen": "yes", "rejected": "no"}) + "\n")
    code, out, _ = rm_dry_run(["--model_name_or_path", minilm_path, "--train_data", str(data), "--eval_data",
                               str(long), "--max_length", "64", "--micro_batch_size", "2", "--zero_stage", "2"],
                              monkeypatch, capsys)
    assert code == 0, out[-2000:]
    report = json.loads(out.split("data (as training reads it):\n", 1)[1].split("\n}\n", 1)[0] + "\n}")
    assert report["train_data"] == {"pairs": 8, "skipped": {"pair(s) skipped: empty 'chosen' response": 1},
                                   "input_format": "text"}
    assert report["long"]["pairs"] == 1
    # max_eval_pairs caps the held-out split as well as the eval files, as in training
    code, out, _ = rm_dry_run(["--model_name_or_path", minilm_path, "--train_data", str(DEMO_PAIRS), "--eval_data",
                               str(data), "--eval_split_fraction", "0.5", "--max_eval_pairs", "3", "--max_length", "64",
                               "--zero_stage", "2"], monkeypatch, capsys)
    assert code == 0 and '"id_val": {\n  "pairs": 3' in out and '"train": {\n  "pairs": 3' in out, out[-3000:]
    assert report["long"]["skipped"] == {"sequence(s) with the prompt cut from the left to fit max_length=64": 2}


def test_ppo_dry_run_reads_the_prompts(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(10))
                       + json.dumps({"text": "no prompt key"}) + "\n")
    code, _, err = ppo_dry_run(tiny_llama_dir, prompts, monkeypatch, capsys)
    assert code == 2 and "prompts.jsonl:11: missing field 'prompt'" in err, err
    prompts.write_text("".join(json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(10))
                       + json.dumps({"prompt": "  "}) + "\n")
    code, out, _ = ppo_dry_run(tiny_llama_dir, prompts, monkeypatch, capsys)
    assert code == 0, out[-2000:]
    assert '"prompts": 8' in out and '"eval_prompts": 2' in out and '"empty prompt(s) skipped": 1' in out


def test_only_engine_imports_deepspeed():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "aplot_rlhf").rglob("*.py")
                 if p.relative_to(REPO).as_posix() != "aplot_rlhf/engine/deepspeed.py"
                 and re.search(r"^\s*(import deepspeed|from deepspeed)", p.read_text(), re.M)]
    assert offenders == []


# ------------------------------------------------------------------ 11: numeric knobs

RM_BASE = ["--model_name_or_path", "m", "--train_data", "t.jsonl"]
PPO_BASE = ["--actor_model", "a", "--reward_model", "r", "--prompt_data", "p.jsonl"]
BAD_KNOBS = [
    ("rm", "learning_rate", "-1e-5"), ("rm", "learning_rate", "0"), ("rm", "learning_rate", "nan"),
    ("rm", "weight_decay", "-0.1"), ("rm", "adam_betas", "0.9 1.0"), ("rm", "adam_betas", "-0.1 0.9"),
    ("rm", "adam_betas", "0.9"), ("rm", "warmup_ratio", "1.5"), ("rm", "warmup_ratio", "-0.1"),
    ("rm", "min_lr_ratio", "2"), ("rm", "max_grad_norm", "-1"), ("rm", "timeout_s", "0"),
    ("rm", "micro_batch_size", "0"), ("rm", "gradient_accumulation_steps", "0"), ("rm", "epochs", "0"),
    ("rm", "epochs", "-1"), ("rm", "max_steps", "-1"), ("rm", "eval_steps", "-5"), ("rm", "eval_batch_size", "0"),
    ("rm", "save_steps", "-1"), ("rm", "save_total_limit", "-1"), ("rm", "log_steps", "0"), ("rm", "seed", "-1"),
    ("rm", "max_train_pairs", "-1"), ("rm", "max_eval_pairs", "-1"), ("rm", "margin_scale", "-1"),
    ("rm", "aplot_gamma", "-1"), ("rm", "aplot_gamma_warmup_steps", "-1"), ("rm", "aplot_eps", "0"),
    ("rm", "aplot_hard_threshold", "-0.1"), ("rm", "dist_backend", "mpi"),
    ("ppo", "learning_rate", "-1"), ("ppo", "critic_learning_rate", "0"), ("ppo", "clip_ratio", "0"),
    ("ppo", "value_clip", "-0.2"), ("ppo", "gamma", "1.1"), ("ppo", "lam", "-0.5"), ("ppo", "top_p", "0"),
    ("ppo", "top_p", "1.5"), ("ppo", "kl_coef", "-0.01"), ("ppo", "kl_target", "0"), ("ppo", "kl_horizon", "0"),
    ("ppo", "reward_clip", "0"), ("ppo", "entropy_coef", "-1"), ("ppo", "ppo_iterations", "0"),
    ("ppo", "ppo_epochs", "0"), ("ppo", "ppo_mini_batch_size", "0"), ("ppo", "rollout_batch_size", "0"),
    ("ppo", "reward_batch_size", "0"), ("ppo", "vllm_tensor_parallel_size", "0"), ("ppo", "max_prompts", "-1"),
    ("ppo", "eval_prompts", "-1"), ("ppo", "warmup_ratio", "2"), ("ppo", "adam_betas", "1 0.9"),
    ("ppo", "max_grad_norm", "-1"), ("ppo", "temperature", "-1"),
]


@pytest.mark.parametrize("job,knob,value", BAD_KNOBS, ids=[f"{j}-{k}={v}" for j, k, v in BAD_KNOBS])
def test_every_numeric_knob_is_checked_before_anything_loads(job, knob, value):
    from aplot_rlhf.config import PPOConfig, RMConfig, load_config
    cls, base = (RMConfig, RM_BASE) if job == "rm" else (PPOConfig, PPO_BASE)
    with pytest.raises(ValueError, match=rf"invalid config:(.|\n)*{knob} must be"):
        parts = value.split()  # --knob=-1e-5: argparse takes a bare -1e-5 for a flag
        load_config(cls, [*base, f"--{knob}={parts[0]}"] if len(parts) == 1 else [*base, f"--{knob}", *parts])


def test_good_defaults_pass_validation():
    from aplot_rlhf.config import PPOConfig, RMConfig, load_config
    load_config(RMConfig, RM_BASE + ["--save_total_limit", "0", "--max_grad_norm", "0", "--warmup_ratio", "0"])
    load_config(PPOConfig, PPO_BASE + ["--gamma", "1", "--lam", "0", "--kl_coef", "0", "--top_p", "1"])


# ------------------------------------------------------------------ 12: --help

def test_help_shows_real_defaults_and_job_true_lines():
    from aplot_rlhf.config import PPOConfig, RMConfig, build_parser
    rm = " ".join(build_parser(RMConfig).format_help().split())  # argparse wraps lines
    ppo = " ".join(build_parser(PPOConfig).format_help().split())
    assert "(default: None)" not in rm and "(default: None)" not in ppo
    assert "(default: runs/rm)" in rm and "(default: 1e-05)" in rm and "AdamW betas (default: 0.9 0.95)" in rm
    assert "passes over the training pairs (default: 1.0)" in rm
    assert "(default: runs/ppo)" in ppo and "runs/rm" not in ppo
    assert "--epochs" not in ppo and "training pairs" not in ppo and "--gradient_accumulation_steps" not in ppo
    assert "checkpoint every N PPO iterations (0 = only at the end) (default: 0)" in ppo
    assert PPOConfig().output_dir == "runs/ppo" and PPOConfig(output_dir="runs/rm").output_dir == "runs/rm"


def test_ppo_refuses_rm_only_flags(tmp_path, capsys):
    from aplot_rlhf.config import PPOConfig, load_config
    with pytest.raises(SystemExit):
        load_config(PPOConfig, PPO_BASE + ["--epochs", "3"])
    assert "unrecognized arguments: --epochs 3" in capsys.readouterr().err
    yml = tmp_path / "ppo.yaml"
    yml.write_text("epochs: 3\n")
    with pytest.raises(ValueError, match="key 'epochs' is not used by this job .*ppo_iterations"):
        load_config(PPOConfig, PPO_BASE + ["--config", str(yml)])


# ------------------------------------------------------------------ 13: one message, no traceback

@pytest.mark.slow  # a whole training run in a subprocess
def test_a_data_error_is_one_line_without_a_traceback(minilm_path, tmp_path):
    data = write_pairs(tmp_path / "broken.jsonl", bad_line='{"prompt": "p", "chosen": ')
    argv = [PYTHON, "-m", "aplot_rlhf.cli.train_rm", "--model_name_or_path", minilm_path, "--train_data", str(data),
            "--output_dir", str(tmp_path / "run"), "--zero_stage", "0", "--max_steps", "1", "--no-progress",
            "--no-tensorboard"]
    proc = subprocess.run(argv, env=python_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {data}:2: malformed JSON (Expecting value"), errors
    debug = subprocess.run(argv, env=python_env() | {"APLOT_DEBUG": "1"}, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr


def test_other_ranks_print_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from aplot_rlhf.data.reading import DataError
    from aplot_rlhf.errors import run_cli

    def bad_input(argv):
        raise DataError("pairs.jsonl:3: missing field 'chosen'\n  more detail")

    monkeypatch.delenv("APLOT_DEBUG", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exc:
        run_cli(bad_input, [])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: pairs.jsonl:3: missing field 'chosen'\n  more detail\n"
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(SystemExit):
        run_cli(bad_input, [])
    assert capsys.readouterr().err == "[rank 3] error: pairs.jsonl:3: missing field 'chosen'\n"

    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_cli(bug, [])
