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
    # distinct-2: "tie by score" has 2 bigrams, both distinct; every one-word answer counts as 1.0
    assert c["distinct2_a"] == 1.0
    assert rq.distinct2("I'm sorry. I'm sorry. I'm sorry.") == pytest.approx(2 / 5)
    assert rq.distinct2("one") == 1.0 and rq.distinct2("a b a b") == pytest.approx(2 / 3)
    lines = rq.answer_stats({("bt", 2): rows(["a b a b", "one"]), ("aplot", 2): rows(["x y"])},
                            {("bt", 2): {"final_kl": 8.6}, ("aplot", 2): {"final_kl": 3.0}})
    assert lines == ["aplot_s2: 1 answers, mean 3 chars, distinct-2 1.00, final KL 3.00",
                     "bt_s2: 2 answers, mean 5 chars, distinct-2 0.83, final KL 8.60"]
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
    flipped = {1: dict(per_seed[1], wins=1, losses=3, win_rate=0.25), 2: per_seed[2]}
    judged = {"bt_s5": {"path": "j/bt", "fp": "aa", "per_seed": per_seed, "bias": bias},
              "aplot_s5": {"path": "j/aplot", "fp": "bb", "per_seed": flipped, "bias": None}}
    text = rq.report(tmp_path, ["aplot", "bt"], judged, trains)
    assert "**62.5% ± 158.8**" in text and "3 / 0 / 1" in text and "40.0% when the chosen answer is the longer" in text
    assert "### Judge `aplot_s5`" in text and "**37.5% ± " in text
    assert "The judges disagree on the side of 50%: bt_s5 62.5%, aplot_s5 37.5%." in text
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["judges"]["bt_s5"]["summary"]["pooled_wins"] == 4 and saved["judges"]["aplot_s5"]["path"] == "j/aplot"


def test_the_judge_must_not_be_a_compared_reward_model(rq, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="neither policy"):
        rq.main(["--rm", f"a={tmp_path / 'a'}", "--rm", f"b={tmp_path / 'b'}", "--judge", str(tmp_path / "a"),
                 "--out", str(tmp_path / "out")])
    # with "{seed}" in a path, the judge must differ from the compared models of every seed
    for name in ("bt_s1", "bt_s2", "aplot_s1", "aplot_s2"):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "config.json").write_text("{}")
    rms = rq.parse_rms([f"aplot={tmp_path}/aplot_s{{seed}}/model", f"bt={tmp_path}/bt_s{{seed}}/model"])
    assert rq.rm_path(rms["bt"], 2) == f"{tmp_path}/bt_s2/model"
    with pytest.raises(SystemExit, match="neither policy"):
        rq.parse_judges([f"{tmp_path}/bt_s2/model"], rms, [1, 2])
    assert rq.parse_judges([f"{tmp_path}/bt_s2/model", f"other={tmp_path}/aplot_s2/model"], rms, [1]) == {
        "bt_s2": f"{tmp_path}/bt_s2/model", "other": f"{tmp_path}/aplot_s2/model"}
    with pytest.raises(SystemExit, match="given twice"):
        rq.parse_judges([f"{tmp_path}/bt_s2/model", f"bt_s2={tmp_path}/aplot_s2/model"], rms, [1])
    with pytest.raises(SystemExit, match="exactly two"):
        rq.parse_rms([f"a={tmp_path / 'a'}"])
    # a reward model is looked for only where a run still trains against it (train()), not when parsed
    assert rq.parse_rms([f"a={tmp_path / 'a'}", f"c={tmp_path / 'c'}"]) == {"a": str(tmp_path / "a"),
                                                                           "c": str(tmp_path / "c")}


def test_judge_scores_are_cached_per_judge_weights_not_per_path(rq, tmp_path, monkeypatch):
    """Two judges, and one judge retrained at the same path, each score the answers themselves: a cache keyed by
    the run alone would hand the second judge the first one's scores."""
    calls = []

    def fake_scores(path, prompts, answers):
        calls.append(path)
        weight = (Path(path) / "model.safetensors").read_bytes()
        return [float(len(a)) * (1 if weight == b"longer" else -1) for a in answers]
    monkeypatch.setattr(rq, "judge_scores", fake_scores)
    judge = tmp_path / "judge"
    judge.mkdir()
    (judge / "config.json").write_text("{}")
    (judge / "model.safetensors").write_bytes(b"longer")
    answers = {("aplot", 1): rows(["a long answer", "b"]), ("bt", 1): rows(["short", "a longer one"])}
    out = tmp_path / "out"
    out.mkdir()
    first = rq.judge_all(out, "j", str(judge), ["aplot", "bt"], [1], answers, "")
    assert (first["per_seed"][1]["wins"], first["per_seed"][1]["losses"]) == (1, 1) and len(calls) == 2
    again = rq.judge_all(out, "j", str(judge), ["aplot", "bt"], [1], answers, "")
    assert again["per_seed"] == first["per_seed"] and len(calls) == 2  # cached: the same weights
    (judge / "model.safetensors").write_bytes(b"shorter")  # retrained at the same path: scored anew
    retrained = rq.judge_all(out, "j", str(judge), ["aplot", "bt"], [1], answers, "")
    assert len(calls) == 4 and retrained["fp"] != first["fp"]
    assert (retrained["per_seed"][1]["wins"], retrained["per_seed"][1]["losses"]) == (1, 1)
    assert retrained["per_seed"][1]["judge_prefers_longer"] == 0.0
    assert first["per_seed"][1]["judge_prefers_longer"] == 1.0
    cache = json.loads((out / "judge_scores.json").read_text())
    assert set(cache) == {first["fp"], retrained["fp"]}
    measured = []
    monkeypatch.setattr(rq, "length_bias_on_pairs", lambda path, pairs: measured.append(pairs) or {"file": pairs})
    for pairs in ("a.jsonl", "a.jsonl", "b.jsonl"):  # cached per judge and pairs file
        assert rq.judge_all(out, "j", str(judge), ["aplot", "bt"], [1], answers, pairs)["bias"] == {"file": pairs}
    assert measured == ["a.jsonl", "b.jsonl"] and len(calls) == 4
    (judge / "model.safetensors").unlink()
    with pytest.raises(SystemExit, match="no weight files"):
        rq.fingerprint(str(judge))


def test_a_run_trained_against_another_reward_model_is_refused(rq, tmp_path):
    out = tmp_path / "out"
    rq.write_json(out / "states" / "train_bt_s1.json", {"rm_path": str(tmp_path / "old_bt"), "policy": "p"})
    with pytest.raises(SystemExit, match="train_bt_s1.json: trained against .*old_bt"):
        rq.train("bt", str(tmp_path / "new_bt"), 1, None, out)
    assert rq.train("bt", str(tmp_path / "old_bt"), 1, None, out)["policy"] == "p"


def test_a_finished_run_needs_no_reward_model_and_a_missing_one_is_named(rq, tmp_path, capsys):
    """Reward models go with the machine that trained them: a run whose state exists is never checked for one; a
    run still to train names the missing folder and the study's --rebuild; a rebuilt model's record travels into
    the run's provenance and the report."""
    out = tmp_path / "out"
    gone = tmp_path / "runs" / "bt_s2" / "model"
    rq.write_json(out / "states" / "train_bt_s2.json", {"rm_path": str(gone), "policy": "p"})
    assert rq.train("bt", str(gone), 2, None, out)["policy"] == "p"
    with pytest.raises(rq.MissingRewardModel, match=r"aplot_s2/model has no config.json .* for seed 2"):
        rq.train("aplot", str(tmp_path / "runs" / "aplot_s2" / "model"), 2, None, out)
    assert rq.rm_path("runs/x_s{seed}/model", 3) == "runs/x_s3/model"
    # a finished run whose reward model's folder now holds other weights is kept, with a note naming both
    gone.mkdir(parents=True)
    (gone / "config.json").write_text("{}")
    (gone / "model.safetensors").write_bytes(b"other weights")
    rq.write_json(out / "states" / "train_bt_s2.json", {"rm_path": str(gone), "policy": "p", "rm_fingerprint": "ab"})
    assert rq.train("bt", str(gone), 2, None, out)["rm_fingerprint"] == "ab"
    assert "now holds other weights than the ab run bt seed 2" in capsys.readouterr().out

    model = tmp_path / "runs" / "aplot_s1" / "model"
    model.mkdir(parents=True)
    assert rq.rm_provenance(str(model)) == {"rebuilt": False}
    rq.write_json(model.parent / "rebuilt.json", {"same_training": False, "final_id_val": 0.62,
                                                  "final_id_val_study": 0.64})
    prov = rq.rm_provenance(str(model))
    assert prov == {"rebuilt": True, "same_training": False, "final_id_val": 0.62, "final_id_val_study": 0.64}
    trains = {(m, 1): {"final_kl": 1.0, "final_reward_raw": 0.1, "rm_path": f"{m}_s1", "rm_fingerprint": "ff",
                       "rm_provenance": prov if m == "aplot" else {"rebuilt": False}} for m in ("aplot", "bt")}
    c = {"n": 2, "wins": 1, "ties": 0, "losses": 1, "win_rate": 0.5, "judge_prefers_longer": 0.5,
         "length_differs": 2, "mean_chars_a": 5.0, "mean_chars_b": 5.0}
    text = rq.report(tmp_path, ["aplot", "bt"], {"j": {"path": "j", "fp": "aa", "per_seed": {1: c}, "bias": None}},
                     trains)
    assert "aplot seed 1 `aplot_s1` (weights ff, trained again, NOT bit for bit (final id_val 0.620, the study's " \
        "0.640))" in text and "bt seed 1 `bt_s1` (weights ff, as given)" in text


def test_main_trains_what_it_can_and_names_the_missing_reward_models(rq, tmp_path, capsys):
    """Each policy needs only its own reward model: with aplot seed 1 finished (state and answers saved, its model
    gone) and bt seed 1's model not on this machine, a judge-less run keeps the first, skips the second and
    exits naming it and the study's --rebuild; --report without a judge is refused before any work."""
    out = tmp_path / "out"
    rq.write_json(out / "states" / "train_aplot_s1.json", {"rm_path": str(tmp_path / "aplot_s1" / "model"),
                                                            "policy": str(tmp_path / "gone"), "final_kl": 1.5})
    rq.write_json(out / "answers" / "aplot_s1.json", [{"prompt": "p", "answer": "a", "tokens": 1}])
    argv = ["--rm", f"aplot={tmp_path}/aplot_s{{seed}}/model", "--rm", f"bt={tmp_path}/bt_s{{seed}}/model",
            "--seeds", "1", "--out", str(out)]
    with pytest.raises(SystemExit, match=r"not trained.*bt_s1/model has no config.json .*--rebuild METHOD:SEED"):
        rq.main(argv)
    printed = capsys.readouterr().out
    assert "skipped: --rm bt" in printed and "1 run(s) trained and answered (aplot_s1)" in printed
    assert "aplot_s1: 1 answers, mean 1 chars, distinct-2 1.00, final KL 1.50" in printed
    with pytest.raises(SystemExit, match="--report needs at least one --judge"):
        rq.main([*argv, "--report"])
