"""The metrics file of a fresh run never mixes in an earlier run's rows; a resumed run appends."""
import json

from aplot_rlhf.metrics import MetricsLogger


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fresh_run_moves_old_metrics_aside_and_resume_appends(tmp_path):
    first = MetricsLogger(str(tmp_path), True, tensorboard=False)
    first.log(1, {"loss": 1.0})
    first.close()
    resumed = MetricsLogger(str(tmp_path), True, tensorboard=False, resume=True)
    resumed.log(2, {"loss": 0.5})
    resumed.close()
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2]
    fresh = MetricsLogger(str(tmp_path), True, tensorboard=False)
    fresh.log(1, {"loss": 2.0})
    fresh.close()
    assert _rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]
    (old,) = tmp_path.glob("metrics.*.jsonl")  # the earlier run's rows are kept, not lost
    assert [r["step"] for r in _rows(old)] == [1, 2]


def test_two_old_files_from_the_same_second_are_both_kept(tmp_path):
    for loss in (1.0, 2.0, 3.0):
        logger = MetricsLogger(str(tmp_path), True, tensorboard=False)
        logger.log(1, {"loss": loss})
        logger.close()
    kept = sorted(r["loss"] for f in tmp_path.glob("metrics.*.jsonl") for r in _rows(f))
    assert kept == [1.0, 2.0] and _rows(tmp_path / "metrics.jsonl")[0]["loss"] == 3.0
