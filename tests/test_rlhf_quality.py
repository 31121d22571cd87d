"""benchmarks/rlhf_quality.py's comparison and report (issue 21 item 3): win rates, ties, the judge's length
preference and the interval over seeds, on hand-made answers and judge scores. The RLHF runs themselves are a
benchmark (an end-to-end smoke run: `--iterations 1 --eval_prompts 8`), never part of the suite."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rq():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("rlhf_quality", REPO / "benchmarks" / "rlhf_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows(answers):
    return [{"prompt": f"p{i}", "answer": a} for i, a in enumerate(answers)]


def test_compare_counts_wins_ties_and_the_judges_length_preference(rq):
    a = rows(["short", "a much longer answer", "same", "x", "tie by score"])
    b = rows(["longer than short", "tiny", "same", "yy", "tie by score!"])
    # p0: a wins (shorter); p1: b wins (shorter); p2: identical answers (tie); p3: a wins (shorter); p4: equal scores
    c = rq.compare(a, b, [1.0, 0.0, 5.0, 2.0, 3.0], [0.5, 1.0, 9.0, 1.0, 3.0])
    assert (c["wins"], c["ties"], c["losses"]) == (2, 2, 1)
    assert c["win_rate"] == pytest.approx((2 + 1) / 5)
    # untied, lengths differ: p0, p1, p3, each won by the shorter answer
    assert c["length_differs"] == 3 and c["judge_prefers_longer"] == 0.0
    assert c["mean_chars_a"] == pytest.approx(sum(map(len, [r["answer"] for r in a])) / 5)
    with pytest.raises(ValueError, match="different prompts"):
        rq.compare(a, rows(["q"] * 4), [0.0] * 5, [0.0] * 4)


def test_summary_over_seeds_and_the_report(rq, tmp_path):
    per_seed = {1: {"n": 4, "wins": 3, "ties": 0, "losses": 1, "win_rate": 0.75, "judge_prefers_longer": 0.5,
                    "length_differs": 4, "mean_chars_a": 10.0, "mean_chars_b": 12.0},
                2: {"n": 4, "wins": 1, "ties": 2, "losses": 1, "win_rate": 0.5, "judge_prefers_longer": 1.0,
                    "length_differs": 2, "mean_chars_a": 11.0, "mean_chars_b": 9.0}}
    s = rq.summarize(per_seed, ["aplot", "bt"])
    assert s["win_rate_mean"] == pytest.approx(0.625)
    # two seeds: t(0.975, 1) = 12.706, sd of (0.75, 0.5) = 0.1768
    assert s["win_rate_ci95"] == pytest.approx(12.706 * 0.17678 / math.sqrt(2), rel=1e-3)
    assert (s["pooled_wins"], s["pooled_losses"], s["pooled_ties"]) == (4, 2, 2)
    assert s["sign_test_p"] == pytest.approx(0.6875)  # two-sided binomial, 2 of 6 at p = 1/2
    trains = {(m, seed): {"final_kl": 4.0, "final_reward_raw": 0.3} for m in ("aplot", "bt") for seed in (1, 2)}
    bias = {"file": "f", "pairs": 10, "accuracy": 0.6, "accuracy_chosen_longer": 0.4, "accuracy_chosen_shorter": 0.8,
            "chosen_longer_share": 0.5}
    text = rq.report(tmp_path, ["aplot", "bt"], per_seed, trains, bias, "judge/model")
    assert "**62.5% ± 158.8**" in text and "3 / 0 / 1" in text and "40.0% when the chosen answer is the longer" in text
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["summary"]["pooled_wins"] == 4 and saved["judge"] == "judge/model"


def test_the_judge_must_not_be_a_compared_reward_model(rq, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="neither policy"):
        rq.main(["--rm", f"a={tmp_path / 'a'}", "--rm", f"b={tmp_path / 'b'}", "--judge", str(tmp_path / "a"),
                 "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="exactly two"):
        rq.parse_rms([f"a={tmp_path / 'a'}"])
    with pytest.raises(SystemExit, match="no config.json"):
        rq.parse_rms([f"a={tmp_path / 'a'}", f"c={tmp_path / 'c'}"])
