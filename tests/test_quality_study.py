"""benchmarks/quality.py's statistics and its state files (issue 21, item 2): the numbers its report rests on.

Pure functions and a report built from hand-made state files; the training and eval subprocesses are covered
by the CLIs' own tests and by the study itself (`--preset smoke` runs the whole path in minutes). The order of
the runs left, and what a stop signal does to the study's child processes (a real child stands in for the trainer:
it handles SIGTERM as the trainer does, saving and exiting, in a second)."""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_study", REPO / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality_study"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_t_interval_matches_the_t_table(quality):
    mean, hw = quality.t_ci95([0.0, 1.0, 2.0])  # sd 1, n 3: t(0.975, 2) = 4.303
    assert mean == 1.0 and hw == pytest.approx(4.303 / math.sqrt(3), rel=1e-3)
    assert math.isnan(quality.t_ci95([0.5])[1])


def test_minimum_detectable_effect(quality):
    # large n: the normal approximation (1.96 + 0.8416) * sd / sqrt(n) holds
    assert quality.mde80(1.0, 200) == pytest.approx(2.8016 / math.sqrt(200), rel=0.01)
    # 8 seeds: noncentral t, a little above the t-quantile sum (2.365 + 0.896) / sqrt(8) = 1.153
    assert quality.mde80(1.0, 8) == pytest.approx(1.156, abs=0.01)
    assert quality.mde80(2.0, 8) == pytest.approx(2 * quality.mde80(1.0, 8), rel=1e-6)
    assert 5 < quality.mde80(1.0, 2) < 15  # finite where scipy's nct goes NaN in the tail
    assert math.isnan(quality.mde80(1.0, 1)) and quality.mde80(0.0, 5) == 0.0


def test_mcnemar_exact(quality):
    assert quality.mcnemar_exact(0, 0) == 1.0
    assert quality.mcnemar_exact(5, 5) == 1.0
    assert quality.mcnemar_exact(10, 0) == pytest.approx(2 / 2 ** 10)
    assert quality.mcnemar_exact(3, 9) == quality.mcnemar_exact(9, 3)


def test_steps_to_reach(quality):
    curve = [[0, 0.5], [25, 0.6], [50, 0.65], [75, 0.64]]
    assert quality.steps_to_reach(curve, 0.6) == 25
    assert quality.steps_to_reach(curve, 0.65) == 50
    assert quality.steps_to_reach(curve, 0.7) is None


def test_bits_are_per_comparison_in_file_order(quality):
    rows = [{"origin": "a", "chosen_scores": [1.0], "rejected_scores": [0.0]},
            {"origin": "b", "chosen_scores": [0.0], "rejected_scores": [0.0]},  # a tie loses
            {"origin": "c", "chosen_scores": [1.0, 0.0, 2.0], "rejected_scores": [0.5, 1.5, -1.0]}]
    b = quality._bits(rows)
    assert b["bits"] == "10" + "101" + "001" + "111" and b["n"] == 11


def _write_smoke_states(quality, tmp_path, monkeypatch, bits):
    """Hand-made state files of the `smoke` preset, one per (method, seed) in `bits` (id_val right/wrong
    per pair); the report reads them alone, never a run folder."""
    monkeypatch.setattr(quality, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(quality, "RUNS", tmp_path / "no_runs_here")
    monkeypatch.setattr(quality, "shorter_wins", lambda preset: {})
    length = {"unit": "characters", "chosen_longer": {"accuracy": 0.5, "n": 2}, "chosen_shorter":
              {"accuracy": 0.5, "n": 2}, "same_length": {"accuracy": None, "n": 0}, "shorter_wins_accuracy": 0.5}
    for (m, s), b in bits.items():
        acc = {"id_val": b.count("1") / 4, "hhh438": 0.5 + 0.01 * s + (0.02 if m.startswith("aplot") else 0.0)}
        tm = {"step": [1, 2], "step_s": [1.0, 1.0]}
        if m.startswith("aplot"):
            tm |= {f"aplot/{k}": [0.5, 0.4] for k in quality.DIAG_KEYS}
        quality.write_json(quality.run_state("smoke", m, s), {
            "method": m, "seed": s, "lr": "1e-4", "threads": 1, "train_s": 10.0, "eval_s": 5.0,
            "machine_train": {"machine": {"cpu": "test", "load_1_5_15": [1.0, 1.0, 1.0]}}, "accuracy": acc,
            "id_val_curve": [[0, 0.25], [2, acc["id_val"]]], "id_val_margin_curve": [[0, 0.0], [2, 0.1]],
            "id_val_eval_rm_accuracy": acc["id_val"], "id_val_gaps": [0.1, -0.1, 0.2, 0.3], "id_val_reward_std": 1.0,
            "length": {"id_val": length}, "correct": {"id_val": {"n": 4, "items_sha1": "x", "bits": b}},
            "train_metrics": tm, "first_step_chosen_reward": 0.1 * s})


def test_report_from_state_files_alone(quality, tmp_path, monkeypatch):
    """Hand-made state files for 2 seeds of bt and aplot: the report's paired table, McNemar counts and
    convergence steps are the ones computed by hand, and no run folder is read."""
    bits = {("bt", 1): "1100", ("aplot", 1): "1110", ("bt", 2): "1010", ("aplot", 2): "0010"}
    _write_smoke_states(quality, tmp_path, monkeypatch, bits)
    text = quality.report("smoke", ["bt", "aplot"], [1, 2])
    summary = json.loads((tmp_path / "results" / "smoke" / "summary.json").read_text())
    d = summary["paired_vs_bt"]["aplot/id_val"]
    assert d["per_seed"] == {"1": 0.25, "2": -0.25} and d["wins"] == 1 and d["losses"] == 1
    assert summary["paired_vs_bt"]["aplot/hhh438"]["mean"] == pytest.approx(0.02)
    mc = summary["mcnemar"]["aplot/id_val"]
    assert (mc["method_only"], mc["bt_only"], mc["n"]) == (1, 1, 8)
    assert summary["steps_to_bt_final"]["aplot"] == {"1": 2, "2": None}
    assert "complete" in text.splitlines()[0]
    assert (tmp_path / "results" / "smoke" / "paired_diff.png").exists()


def test_partial_report_pairs_each_method_with_bt_on_the_seeds_both_finished(quality, tmp_path, monkeypatch):
    """aplot_sel has finished only seed 1: the convergence table still pairs aplot with BT on seeds 1 and 2
    (not only on the seeds every method finished), marks aplot_sel's missing seed as not run, and says that bt's and
    aplot's numbers are final while aplot_sel's are not."""
    bits = {("bt", 1): "1100", ("aplot", 1): "1110", ("bt", 2): "1010", ("aplot", 2): "0010",
            ("aplot_sel", 1): "1111"}
    _write_smoke_states(quality, tmp_path, monkeypatch, bits)
    text = quality.report("smoke", ["bt", "aplot", "aplot_sel"], [1, 2])
    summary = json.loads((tmp_path / "results" / "smoke" / "summary.json").read_text())
    assert summary["steps_to_bt_final"]["aplot"] == {"1": 2, "2": None}
    assert summary["steps_to_bt_final"]["aplot_sel"] == {"1": 2}
    assert "| aplot_sel | 2 | · | 1 / 1 | 2 |" in text.splitlines()
    assert "| aplot | 2 | — | 1 / 2 | 2 |" in text.splitlines()
    assert "PARTIAL" in text.splitlines()[0]
    assert ("**Partial: 1 of 2 planned seeds have every method. bt, aplot have all 2 planned seeds: their rows, "
            "and the paired differences with BT of aplot, are final. The numbers of aplot_sel describe the seeds "
            "done so far; no conclusion is drawn from them.**") in text.splitlines()


def test_state_files_are_not_git_ignored(quality):
    """The committed state is the study's only record in a fresh checkout: git must not ignore its paths
    (the repository ignores every folder named runs/)."""
    import shutil
    import subprocess
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (quality.run_state("full", "bt", 1), quality.state_dir("full") / "lr_check.json"):
        rc = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO).returncode
        assert rc == 1, f"{path} is ignored by git"


def test_rank_and_aplot_setting_are_chosen_on_id_val(quality, tmp_path, monkeypatch):
    """The smollm2 preset's two selections read only the check state: the best final id_val wins, a tie goes to
    the smaller rank / the earlier (default) setting, and the pick is written back; the runs then use it."""
    monkeypatch.setattr(quality, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(quality, "RUNS", tmp_path / "runs")
    preset = "smollm2"
    with pytest.raises(SystemExit, match="rank pilot is incomplete"):
        quality.chosen_rank(preset)
    run = lambda acc: {"final_id_val": acc, "curve": [[0, 0.5], [75, acc]]}  # noqa: E731
    quality.write_json(quality.state_dir(preset) / "lr_check.json", {
        "seed": 0, "train_pairs": 600, "lrs": ["1e-4", "3e-4", "1e-3"], "methods": {},
        "rank_pilot": {"lr": "3e-4", "runs": {"8": run(0.61), "16": run(0.64), "32": run(0.64)}},
        "aplot_variants": {"lr": "3e-4", "flags": {v: quality.METHODS[v] for v in ["aplot", "aplot_lam0.5",
                                                                                    "aplot_gamma2"]},
                           "runs": {"aplot": run(0.60), "aplot_lam0.5": run(0.62), "aplot_gamma2": run(0.62)}}})
    assert quality.chosen_rank(preset) == "16"  # 16 and 32 tie: the smaller
    assert quality.chosen_variant(preset) == "aplot_lam0.5"  # lam0.5 and gamma2 tie: the earlier
    assert quality.lr_state(preset)["rank_pilot"]["chosen"] == "16"
    assert quality.method_flags(preset, "aplot_sel") == quality.METHODS["aplot_lam0.5"]
    cmd = quality.train_cmd(preset, tmp_path / "out", 1, "3e-4", quality.method_flags(preset, "aplot_sel"))
    assert cmd[cmd.index("--lora_rank") + 1] == "16" and cmd[cmd.index("--lora_alpha") + 1] == "32"
    assert "--share_prompt" in cmd and "--packing" in cmd and cmd[cmd.index("--max_length") + 1] == "256"
    assert cmd[cmd.index("--model_name_or_path") + 1].endswith(".gguf")
    assert cmd[cmd.index("--aplot_lambda") + 1] == "0.5"
    text = quality.report(preset, ["bt", "aplot", "aplot_sel"], [1])  # no runs yet: the selections only
    assert "| 16 | 64.0 | yes |" in text and "| aplot_lam0.5 (`--loss aplot --aplot_lambda 0.5" in text


def test_lr_grid_extends_upward_only_while_the_best_is_the_largest(quality, tmp_path, monkeypatch):
    """A loss whose best check lr is the grid's top trains at the next of lr_extend before its lr is chosen; one
    whose best is inside the grid does not; the report's lr table shows the extra column."""
    monkeypatch.setattr(quality, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(quality, "RUNS", tmp_path / "runs")
    preset = "smollm2"
    run = lambda acc: {"final_id_val": acc, "curve": [[0, 0.5], [75, acc]]}  # noqa: E731
    state = {"seed": 0, "train_pairs": 600, "lrs": ["1e-4", "3e-4", "1e-3"],
             "methods": {"bt": {"runs": {"1e-4": run(0.570), "3e-4": run(0.655), "1e-3": run(0.675)}},
                         "aplot": {"runs": {"1e-4": run(0.600), "3e-4": run(0.640), "1e-3": run(0.630)}}}}
    path = quality.state_dir(preset) / "lr_check.json"
    quality.write_json(path, state)
    assert quality.method_lrs(preset, "bt") == ["1e-4", "3e-4", "1e-3", "3e-3"]
    assert quality.chosen_lr(preset, "bt") == ""  # 3e-3 not trained yet: the check is incomplete
    assert quality.method_lrs(preset, "aplot") == ["1e-4", "3e-4", "1e-3"]
    assert quality.chosen_lr(preset, "aplot") == "3e-4"
    state = quality.lr_state(preset)
    state["methods"]["bt"]["runs"]["3e-3"] = run(0.690)  # the top again: one step further, and no more after it
    quality.write_json(path, state)
    assert quality.method_lrs(preset, "bt") == ["1e-4", "3e-4", "1e-3", "3e-3", "1e-2"]
    state["methods"]["bt"]["runs"]["1e-2"] = run(0.500)
    quality.write_json(path, state)
    assert quality.method_lrs(preset, "bt") == ["1e-4", "3e-4", "1e-3", "3e-3", "1e-2"]
    assert quality.chosen_lr(preset, "bt") == "3e-3"
    text = "\n".join(quality.selection_tables(quality.lr_state(preset)))
    assert "| method | lr 1e-4 | lr 3e-4 | lr 1e-3 | lr 3e-3 | lr 1e-2 | chosen |" in text
    assert "| bt | 57.0 | 65.5 | 67.5 | 69.0 | 50.0 | 3e-3 |" in text
    assert "| aplot | 60.0 | 64.0 | 63.0 | — | — | 3e-4 |" in text
    assert "lrs beyond the grid" in text


def test_rebuild_trains_the_state_s_run_again_and_checks_it_is_the_same_training(quality, tmp_path, monkeypatch):
    """--rebuild reruns a finished run's training (the state's lr, flags and thread count) into its run folder and
    calls it the study's model only when every periodic id_val eval equals the state's bit for bit (and the
    weights, where the state has their fingerprint); a margin one float step off, evals on other steps, or other
    weights are each recorded and reported as a near-copy. The trainer subprocess is replaced by one that writes
    what a training leaves: metrics.jsonl, an exported model, checkpoints."""
    import math
    import shutil
    monkeypatch.setattr(quality, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(quality, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(quality, "chosen_rank", lambda preset, required=True: "")
    margin = 0.1234567890123
    study = {"method": "aplot", "seed": 3, "lr": "3e-4", "flags": ["--loss", "aplot"], "threads": 7,
             "accuracy": {"id_val": 0.75}, "id_val_curve": [[0, 0.5], [2, 0.75]],
             "id_val_margin_curve": [[0, 0.0], [2, margin]],
             "machine_train": {"machine": {"cpu": "the study's CPU"}}}
    quality.write_json(quality.run_state("smoke", "aplot", 3), study)
    calls, written = [], {"steps": [0, 2], "margin": margin, "weights": b"w1"}

    def fake_run(cmd, log_path, threads):
        calls.append((cmd, threads))
        out = log_path.parent
        rows = [{"step": s, "eval/id_val/accuracy": a, "eval/id_val/rewards/margins": m}
                for s, a, m in zip(written["steps"], [0.5, 0.75], [0.0, written["margin"]])]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "model").mkdir()
        (out / "model" / "config.json").write_text("{}")
        (out / "model" / "model.safetensors").write_bytes(written["weights"])
        (out / "checkpoints").mkdir()
    monkeypatch.setattr(quality, "_run", fake_run)
    out = quality.run_dir("smoke", "aplot", 3)

    rec = quality.rebuild("smoke", "aplot", 3, 1)
    cmd, threads = calls[0]
    assert threads == 7  # the study run's, not the one asked for
    assert cmd[cmd.index("--learning_rate") + 1] == "3e-4" and cmd[cmd.index("--seed") + 1] == "3"
    assert cmd[cmd.index("--loss") + 1] == "aplot"
    assert rec["same_training"] and rec["same_weights"] is None and rec["final_id_val"] == 0.75
    assert not (out / "checkpoints").exists() and quality.trained_s(out) is not None
    assert quality.rebuild("smoke", "aplot", 3, 1) == rec and len(calls) == 1  # done: not trained again

    def again(**change):
        shutil.rmtree(out)
        written.update(change)
        return quality.rebuild("smoke", "aplot", 3, 1)
    rec = again(margin=math.nextafter(margin, 1.0))  # one float step, through JSON and back
    assert not rec["same_training"] and 0 < rec["max_abs_margin_diff"] < 1e-15
    assert json.loads((out / "rebuilt.json").read_text())["same_training"] is False
    rec = again(margin=margin, steps=[0, 3])
    assert not rec["same_training"] and not rec["same_eval_steps"] and rec["max_abs_margin_diff"] is None

    # a state that knows its model's weights: equal curves are not enough when the weights differ
    quality.write_json(quality.run_state("smoke", "aplot", 3), dict(study, model_fingerprint="0" * 16))
    rec = again(steps=[0, 2])
    assert rec["same_eval_steps"] and rec["same_weights"] is False and not rec["same_training"]
    shutil.rmtree(out)
    written["weights"] = b"w2"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    (out / "model" / "model.safetensors").write_bytes(b"w2")
    fp = quality.model_fingerprint(out / "model")
    shutil.rmtree(out)
    quality.write_json(quality.run_state("smoke", "aplot", 3), dict(study, model_fingerprint=fp))
    assert quality.rebuild("smoke", "aplot", 3, 1)["same_weights"] is True

    # a folder with a model and the completion marker but no record of being a rebuild or the study's eval is
    # trained again, never taken for the study's own model; the study's own folder (ood.json) is
    (out / "train_done.json").write_text(json.dumps({"train_s": 1.0}))
    n = len(calls)
    assert quality.rebuild("smoke", "aplot", 3, 1)["rebuilt"] and len(calls) == n + 1
    (out / "train_done.json").write_text(json.dumps({"train_s": 1.0}))
    (out / "ood.json").write_text("{}")
    assert quality.rebuild("smoke", "aplot", 3, 1) == {
        "method": "aplot", "seed": 3, "rebuilt": False, "same_training": True,
        "note": "the study's own run folder: its model is the one the state evaluated"}

    with pytest.raises(SystemExit, match="no state file .*bt_s3.json"):
        quality.rebuild("smoke", "bt", 3, 1)
    assert quality.parse_rebuild("bt:2, aplot_sel:5") == [("bt", 2), ("aplot_sel", 5)]
    for bad in ("bt", "nope:1", "bt:x"):
        with pytest.raises(SystemExit, match="METHOD:SEED"):
            quality.parse_rebuild(bad)


def test_study_order_completes_bt_aplot_pairs_first(quality, tmp_path, monkeypatch):
    """The SmolLM2 study's state after four sessions: BT seeds 1, 2, 3, 5, APLOT 1-3, aplot_sel 1 and 5. The runs
    left come as APLOT seed 5 (its BT partner is done), BT and APLOT seed 4, then aplot_sel by the same rule."""
    monkeypatch.setattr(quality, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(quality, "RUNS", tmp_path / "no_runs_here")
    for m, seeds in {"bt": [1, 2, 3, 5], "aplot": [1, 2, 3], "aplot_sel": [1, 5]}.items():
        for s in seeds:
            quality.write_json(quality.run_state("smollm2", m, s), {"method": m, "seed": s})
    methods, seeds = ["bt", "aplot", "aplot_sel"], [1, 2, 3, 4, 5]
    assert quality.study_order("smollm2", methods, seeds) == [
        ("aplot", 5), ("bt", 4), ("aplot", 4), ("aplot_sel", 2), ("aplot_sel", 3), ("aplot_sel", 4)]
    # a single method asked for: BT seed 4 waits for nothing, and finished runs never come back
    assert quality.study_order("smollm2", ["bt"], seeds) == [("bt", 4)]
    # a fresh study: seed-major within each group, the ablations last
    assert quality.study_order("quick", ["bt", "aplot_gamma2", "aplot"], [1, 2]) == [
        ("bt", 1), ("aplot", 1), ("bt", 2), ("aplot", 2), ("aplot_gamma2", 1), ("aplot_gamma2", 2)]


_CHILD = '''import os, pathlib, signal, sys, time
d = pathlib.Path(sys.argv[1])
def on_term(signum, frame):  # like a trainer: finish the step, save, exit 75
    (d / "got_sigterm").write_text("1")
    time.sleep(1)
    (d / "saved").write_text("1")
    sys.exit(75)
signal.signal(signal.SIGTERM, on_term)
(d / "started").write_text(str(os.getpid()))
time.sleep(120)
'''

_DRIVER = '''import importlib.util, sys
from concurrent.futures import ThreadPoolExecutor
spec = importlib.util.spec_from_file_location("quality_study", sys.argv[1])
q = importlib.util.module_from_spec(spec)
spec.loader.exec_module(q)
child, mode, dirs = sys.argv[2], sys.argv[3], sys.argv[4:]
if mode == "nohup":
    import signal
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
q.stop_children_on_signals()

def one(d):
    with open(d + "/log", "w") as fh:
        q.run_child([sys.executable, child, d], fh, 1)

if mode == "pool":  # the study's path: runs in worker threads, the main thread waits on their futures
    q._pool = ThreadPoolExecutor(max_workers=1)
    for f in [q._pool.submit(one, d) for d in dirs]:
        f.result()
else:  # --rebuild's and rlhf_quality.py's path: the main thread waits on the child itself
    for d in dirs:
        one(d)
'''


def _start_study_like(tmp_path, mode, n_runs):
    import subprocess
    import time
    (tmp_path / "child.py").write_text(_CHILD)
    (tmp_path / "driver.py").write_text(_DRIVER)
    dirs = [tmp_path / f"run{i}" for i in range(n_runs)]
    for d in dirs:
        d.mkdir()
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(REPO / "benchmarks" / "quality.py"),
                             str(tmp_path / "child.py"), mode, *map(str, dirs)])
    deadline = time.time() + 120
    while not (dirs[0] / "started").exists():
        assert proc.poll() is None and time.time() < deadline, "the study-like driver never started its child"
        time.sleep(0.1)
    return proc, dirs


@pytest.mark.parametrize("mode", ["pool", "main"])
def test_a_stopped_study_stops_its_child_and_starts_no_other(tmp_path, mode):
    """SIGTERM to a study (or rlhf_quality.py) reaches its running trainer, which saves and exits, before the
    study exits with 143; the run queued behind it never starts. Before, `kill <study>` left the trainer running."""
    import signal
    proc, dirs = _start_study_like(tmp_path, mode, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert (dirs[0] / "got_sigterm").exists() and (dirs[0] / "saved").exists()  # waited for the save
    assert not (dirs[1] / "started").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(int((dirs[0] / "started").read_text()), 0)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_study_takes_its_child_with_it(tmp_path):
    """SIGKILL cannot be handled: the kernel sends the orphaned trainer SIGTERM (PR_SET_PDEATHSIG)."""
    import time
    proc, dirs = _start_study_like(tmp_path, "main", 1)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while not (dirs[0] / "saved").exists():
        assert time.time() < deadline, "the child outlived the killed study by 30 s"
        time.sleep(0.1)


def test_a_study_under_nohup_survives_sighup(tmp_path):
    """nohup (the study's documented command) ignores SIGHUP; the study keeps that, so a closed terminal stops
    neither it nor its trainer. SIGTERM still does."""
    import signal
    import time
    proc, dirs = _start_study_like(tmp_path, "nohup", 1)
    proc.send_signal(signal.SIGHUP)
    time.sleep(2)
    assert proc.poll() is None and not (dirs[0] / "got_sigterm").exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM and (dirs[0] / "saved").exists()
