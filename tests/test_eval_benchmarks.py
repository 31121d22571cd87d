"""eval_rm on the field's benchmarks (issue 21, item 1): RM-Bench, RewardBench v1 and v2, the length diagnostic.

Files are written here in each benchmark's own format; scores come from a table keyed by response text
(injected where eval_rm would call the model), so every official number below is computed by hand. One
end-to-end run per tiny real model checks that packed and padded scoring give the same scores.
"""
import json
from pathlib import Path

import pytest

from aplot_rlhf.eval import attach_scores, benchmark_report, rm_bench_scores
from aplot_rlhf.eval_formats import read_benchmark


def scored(bench, table: dict) -> list[dict]:
    """The benchmark's items with the scores of `table` (response text -> score), in encode_items' order."""
    return attach_scores(bench.items, [table[r] for it in bench.items for r in it["chosen"] + it["rejected"]])


def rm_bench_item(tag: str, chosen: list[float], rejected: list[float], table: dict, **extra) -> dict:
    """An RM-Bench item whose response k of each side scores chosen[k] / rejected[k] (texts unique per item)."""
    c = [f"{tag} chosen {k} " + "x" * (10 * k) for k in range(3)]
    r = [f"{tag} rejected {k} " + "y" * (10 * k) for k in range(3)]
    table.update(zip(c, chosen))
    table.update(zip(r, rejected))
    return {"id": tag, "prompt": f"prompt {tag}?", "chosen": c, "rejected": r, **extra}


def write_json(path: Path, rows, lines: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if lines else json.dumps(rows, indent=2))
    return path


# ------------------------------------------------------------------ RM-Bench

def test_rm_bench_official_scores_by_hand(tmp_path):
    table = {}
    chat = [rm_bench_item("A", [1, 2, 3], [0, 0, 0], table, subset="alpacaeval"),  # wins all 9
            rm_bench_item("B", [0, 1, 2], [0.5, 1.5, 2.5], table, subset="alpacaeval")]  # wins below the diagonal
    safety = [rm_bench_item("C", [5, 5, 5], [5, 5, 5], table, domain="safety-refuse"),  # all ties: all lost
              rm_bench_item("D", [3, 0, 0], [1, 2, 4], table, subset="xstest-should-respond")]  # wins (0,0), (0,1)
    write_json(tmp_path / "bench" / "chat_filtered.json", chat)  # domain from the file name
    write_json(tmp_path / "bench" / "more.jsonl", safety, lines=True)  # from the domain field, then the subset
    bench = read_benchmark(str(tmp_path / "bench"))
    assert bench.format == "rm-bench" and [it["domain"] for it in bench.items] == [
        "chat", "chat", "safety-refuse", "safety-response"]
    out = benchmark_report(bench.format, scored(bench, table))
    # chat: upper cells A 1, B 0 -> hard 1/2; diagonal 1/2; lower cells 1 and 1 -> easy 1; score 2/3
    # safety (C and D pooled): hard (0 + 1/3)/2 = 1/6, normal 1/6, easy 0, score 1/9
    expect = {"chat": (1 / 2, 1 / 2, 1, 2 / 3, 2), "safety": (1 / 6, 1 / 6, 0, 1 / 9, 2)}
    assert list(out["domains"]) == ["chat", "safety"]
    for name, (hard, normal, easy, score, n) in expect.items():
        d = out["domains"][name]
        assert (d["hard"], d["normal"], d["easy"], d["score"], d["n"]) == pytest.approx((hard, normal, easy, score, n))
    assert out["hard"] == pytest.approx(1 / 3) and out["normal"] == pytest.approx(1 / 3)
    assert out["easy"] == pytest.approx(1 / 2) and out["overall"] == pytest.approx(7 / 18)
    assert out["accuracy"] == pytest.approx(14 / 36) and (out["n"], out["n_pairs"]) == (4, 36)
    assert "matrix" not in out["domains"]["chat"]
    matrix = benchmark_report(bench.format, scored(bench, table), details=True)["domains"]["chat"]["matrix"]
    assert matrix == [[0.5, 0.5, 0.5], [1, 0.5, 0.5], [1, 1, 0.5]]  # rows: chosen style; columns: rejected


def test_rm_bench_hard_is_above_the_diagonal_and_easy_below():
    """Chosen i beats rejected j only when i's style is fancier (i > j): that is easy, not hard."""
    item = {"chosen": ["a", "b", "c"], "rejected": ["d", "e", "f"], "domain": "code",
            "chosen_scores": [0, 1, 2], "rejected_scores": [0.5, 1.5, 2.5]}
    out = rm_bench_scores([item])
    assert (out["hard"], out["normal"], out["easy"]) == (0, 0, 1)
    assert out["domains"]["code"]["score"] == pytest.approx(1 / 3)


def test_rm_bench_refuses_malformed_items_naming_file_item_and_field(tmp_path):
    table = {}
    items = [rm_bench_item("A", [1, 2, 3], [0, 0, 0], table), rm_bench_item("B", [1, 2, 3], [0, 0, 0], table)]
    items[1]["chosen"] = items[1]["chosen"][:2]
    path = write_json(tmp_path / "chat_filtered.json", items)
    with pytest.raises(ValueError, match=r"chat_filtered.json:item 1: field 'chosen' must be a list of 3 strings "
                                         r"\(concise, detailed plain, detailed markdown\), got a list of 2"):
        read_benchmark(str(path), "rm-bench")
    items = [rm_bench_item("A", [1, 2, 3], [0, 0, 0], table)]
    with pytest.raises(ValueError, match=r"x.json:item 0: RM-Bench domain unknown .*'domain' field"):
        read_benchmark(str(write_json(tmp_path / "x.json", items)))
    items[0]["rejected"][1] = "  "
    with pytest.raises(ValueError, match=r"chat_filtered.json:item 0: field 'rejected'\[1\] is empty"):
        read_benchmark(str(write_json(tmp_path / "chat_filtered.json", items)))


# ------------------------------------------------------------------ RewardBench v1 and v2

def rewardbench_rows(table: dict) -> list[dict]:
    rows = []
    for subset, wins in [("alpacaeval-easy", [1, 1]), ("mt-bench-easy", [1, 0]), ("math-prm", [1, 0]),
                         ("hep-python", [1, 1, 1]), ("hep-go", [0]), ("xstest-should-respond", [0]),
                         ("my-own-subset", [1])]:
        for k, won in enumerate(wins):
            c, r = f"{subset} {k} chosen", f"{subset} {k} rejected"
            table[c], table[r] = (1.0, 0.0) if won else (0.0, 0.0)  # a tie loses
            rows.append({"prompt": f"{subset} {k}?", "chosen": c, "rejected": r, "subset": subset, "id": len(rows)})
    return rows


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_rewardbench_section_weighted_score_by_hand(tmp_path, suffix, caplog):
    table = {}
    rows = rewardbench_rows(table)
    path = tmp_path / f"rb.{suffix}"
    if suffix == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        write_json(path, rows, lines=True)
    bench = read_benchmark(str(path))
    assert bench.format == "rewardbench"
    out = benchmark_report(bench.format, scored(bench, table))
    # Chat: (1*2 + 0.5*2)/4; Reasoning: math-prm (0.5) weighted as hep-python + hep-go together (4 rows):
    # (0.5*4 + 1*3 + 0*1)/8 = 5/8 (not (1 + 3 + 0)/6 by rows); Safety 0; my-own-subset in no section
    assert out["sections"] == pytest.approx({"Chat": 0.75, "Reasoning": 0.625, "Safety": 0.0})
    assert out["score"] == pytest.approx((0.75 + 0.625 + 0) / 3)
    assert out["subsets"]["hep-python"] == {"accuracy": 1.0, "n": 3}
    assert out["subsets"]["my-own-subset"] == {"accuracy": 1.0, "n": 1}
    assert out["unknown_subsets"] == {"my-own-subset": 1}
    assert out["accuracy"] == pytest.approx(8 / 12) and out["n"] == 12


def rewardbench2_rows(table: dict, ties: bool = False) -> list[dict]:
    spec = [("Factuality", 3, [1, 2, 2.9]), ("Factuality", 3, [1, 3, 0]),  # correct; a tie with one: wrong
            ("Math", 1, [0, 0, 0]), ("Focus", 0, [1, -1, -1]), ("Other", 1, [0, 0, 0])]
    rows = []
    for k, (subset, c, rs) in enumerate(spec):
        chosen, rejected = [f"{k} chosen"], [f"{k} rejected {j}" for j in range(3)]
        table.update({chosen[0]: c, **dict(zip(rejected, rs))})
        rows.append({"id": k, "prompt": f"q{k}", "chosen": chosen, "rejected": rejected, "subset": subset,
                     "num_correct": 1, "num_incorrect": 3, "total_completions": 4})
    if ties:
        rows.insert(2, {"id": 99, "prompt": "q", "chosen": ["t1", "t2"], "rejected": ["t3", "t4", "t5"],
                        "subset": "Ties", "num_correct": 2, "num_incorrect": 3, "total_completions": 5})
    return rows


def test_rewardbench2_best_of_4_and_ties(tmp_path):
    table = {}
    path = write_json(tmp_path / "v2.json", rewardbench2_rows(table))
    bench = read_benchmark(str(path))
    assert bench.format == "rewardbench2"
    out = benchmark_report(bench.format, scored(bench, table))
    assert {s: v["accuracy"] for s, v in out["subsets"].items()} == {
        "Factuality": 0.5, "Math": 1.0, "Focus": 0.0, "Other": 1.0}
    assert out["score"] == pytest.approx(0.5) and out["unknown_subsets"] == {"Other": 1}  # mean of v2's subsets
    assert out["n_pairs"] == 15 and out["accuracy"] == pytest.approx(13 / 15)  # 3 + 2 + 3 + 2 + 3 rejected beaten
    ties = write_json(tmp_path / "v2ties.jsonl", rewardbench2_rows({}, ties=True), lines=True)
    with pytest.raises(ValueError, match=r"v2ties.jsonl:3: RewardBench 2's Ties subset \(1 rows\) .*--skip_ties"):
        read_benchmark(str(ties))
    bench = read_benchmark(str(ties), skip_ties=True)
    assert len(bench.items) == 5 and bench.skipped == {"RewardBench 2 Ties rows": 1}


def test_eval_rm_refuses_a_bad_file_before_loading_the_model(tmp_path):
    """The folder given as --model holds no model: the data error must come first (no minutes of loading)."""
    from aplot_rlhf.cli import eval_rm
    ties = write_json(tmp_path / "v2.jsonl", rewardbench2_rows({}, ties=True), lines=True)
    with pytest.raises(ValueError, match=r"v2.jsonl:3: RewardBench 2's Ties subset"):
        eval_rm.main(["--model", str(tmp_path), "--data", str(ties)])


def test_format_detection_and_mixed_files(tmp_path):
    assert read_benchmark(str(write_json(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"}], lines=True))).format == "pairs"
    v2_plain = [{"prompt": "q", "chosen": ["a"], "rejected": ["b", "c", "d"], "subset": "Math"}]  # no v2 columns
    assert read_benchmark(str(write_json(tmp_path / "v2.json", v2_plain))).format == "rewardbench2"
    mixed = [{"prompt": "q", "chosen": "a", "rejected": "b", "subset": "s"},
             {"prompt": "q", "chosen": ["a", "b", "c"], "rejected": ["d", "e", "f"], "domain": "chat"}]
    with pytest.raises(ValueError, match=r"mixed.json: the records mix formats \(rewardbench at .*mixed.json:item 0, "
                                         r"rm-bench at .*mixed.json:item 1\); pass --format"):
        read_benchmark(str(write_json(tmp_path / "mixed.json", mixed)))


# ------------------------------------------------------------------ the length diagnostic

def test_length_diagnostic_on_a_hand_made_set(tmp_path):
    table = {"aaaa": 1, "bb": 0,  # chosen longer, won
             "a": 0, "bbb": 1,  # chosen shorter, lost
             "aa": 2, "bbbbb": 1,  # chosen shorter, won
             "ccc": 1, "ddd": 1}  # same length, a tie: lost
    rows = [{"prompt": "q", "chosen": c, "rejected": r} for c, r in
            [("aaaa", "bb"), ("a", "bbb"), ("aa", "bbbbb"), ("ccc", "ddd")]]
    bench = read_benchmark(str(write_json(tmp_path / "p.jsonl", rows, lines=True)))
    out = benchmark_report(bench.format, scored(bench, table))
    assert out["length"] == {"unit": "characters", "chosen_longer": {"accuracy": 1.0, "n": 1},
                             "chosen_shorter": {"accuracy": 0.5, "n": 2}, "same_length": {"accuracy": 0.0, "n": 1},
                             "shorter_wins_accuracy": 0.5}
    assert out["accuracy"] == 0.5 and out["n"] == 4


def test_rm_bench_length_diagnostic_counts_all_nine_pairs():
    item = {"chosen": ["c", "cc cc", "c" * 20], "rejected": ["r", "rrr", "r" * 30], "domain": "chat",
            "chosen_scores": [0, 0, 0], "rejected_scores": [1, 1, 1]}
    out = benchmark_report("rm-bench", [item])["length"]
    # lengths chosen 1, 5, 20 vs rejected 1, 3, 30: longer (1,0), (1,1), (2,0), (2,1); same (0,0); the rest shorter
    assert (out["chosen_longer"]["n"], out["chosen_shorter"]["n"], out["same_length"]["n"]) == (4, 4, 1)
    assert out["shorter_wins_accuracy"] == pytest.approx(4 / 9) and out["chosen_shorter"]["accuracy"] == 0


# ------------------------------------------------------------------ end to end, a real tiny model

@pytest.fixture(scope="module")
def minilm_rm_dir(minilm_path, tmp_path_factory) -> str:
    """MiniLM with a (random, fixed-seed) score head saved in its checkpoint, as train_rm exports one."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("minilm_rm")
    AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def llama_rm_dir(tiny_llama_dir, tmp_path_factory) -> str:
    """The tiny Llama with a score head saved (a decoder: the reward is read at the last non-pad token)."""
    import torch
    from transformers import LlamaForSequenceClassification
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("llama_rm")
    LlamaForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1).save_pretrained(out)
    for f in Path(tiny_llama_dir).glob("*token*"):
        (out / f.name).write_bytes(f.read_bytes())
    return str(out)


@pytest.mark.parametrize("model", ["minilm_rm_dir", "llama_rm_dir"])
def test_eval_rm_end_to_end_packed_equals_padded(model, request, tmp_path, capsys, caplog):
    """RM-Bench-format file -> eval_rm CLI: the official keys, and the same scores packed and padded."""
    import logging

    from aplot_rlhf.cli import eval_rm
    model_dir = request.getfixturevalue(model)
    items = [{"id": k, "subset": "alpacaeval", "prompt": f"What is {k} plus {k}?",
              "chosen": [f"{2 * k}.", f"The sum of {k} and {k} is {2 * k}.", f"**Answer:** {2 * k}\n\n- {k} + {k}"],
              "rejected": [f"{2 * k + 1}.", f"The sum of {k} and {k} is {2 * k + 1}, I think.",
                           f"**Answer:** {2 * k + 1}\n\n- close"]} for k in range(5)]
    path = write_json(tmp_path / "chat_filtered.json", items)
    caplog.set_level(logging.INFO)
    runs = {}
    for packing in ("on", "off"):
        out = eval_rm.main(["--model", model_dir, "--data", str(path), "--packing", packing, "--batch_size", "2",
                            "--scores_dir", str(tmp_path / packing)])
        last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert last == json.loads(json.dumps(out))
        runs[packing] = [json.loads(line) for line in (tmp_path / packing / "chat_filtered.jsonl").open()]
        entry = last["chat_filtered"]
        assert {"hard", "normal", "easy", "overall", "domains", "accuracy", "n", "n_pairs", "format",
                "length"} <= set(entry)
        assert entry["format"] == "rm-bench" and entry["n"] == 5 and entry["n_pairs"] == 45
        assert set(entry["domains"]) == {"chat"}
        assert entry["overall"] == pytest.approx(entry["domains"]["chat"]["score"])
    assert "(rm-bench, packed batches)" in caplog.text and "responses/s" in caplog.text
    assert "(rm-bench, padded batches)" in caplog.text
    packed, padded = runs["on"], runs["off"]
    assert len(packed) == len(padded) == 5
    for a, b in zip(packed, padded):
        assert a["chosen_scores"] == pytest.approx(b["chosen_scores"], abs=1e-5)
        assert a["rejected_scores"] == pytest.approx(b["rejected_scores"], abs=1e-5)
    # the printed official scores are those of the saved scores
    scored_items = [{**it, **sc, "domain": "chat"} for it, sc in zip(items, packed)]
    assert rm_bench_scores(scored_items)["overall"] == pytest.approx(entry["overall"], abs=1e-6)
