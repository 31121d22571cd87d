"""Preference data: formats, keys, chat templates, truncation, padding, and every kind of bad input."""
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from aplot_rlhf.data.collate import collate_pairs
from aplot_rlhf.data.pair_tokenizer import PairTokenizer
from aplot_rlhf.data.pairs import load_pairs, parse_eval_specs, split_pairs
from aplot_rlhf.data.reading import DataError
from aplot_rlhf.data.sampler import PairSampler
from helpers import HH_PAIRS

ROWS = [
    {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": "Hello!", "rejected": "Go away.", "strength": 2},
    {"prompt": "\n\nHuman: 2+2?\n\nAssistant:", "chosen": "4", "rejected": "5", "strength": None},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_real_hh_file_loads(caplog):
    with caplog.at_level("WARNING"):
        pairs = load_pairs(str(HH_PAIRS))
    assert len(pairs) == 1997  # the file has 3 pairs whose chosen response is empty: skipped and counted
    assert "3 pair(s) skipped: empty 'chosen' response" in caplog.text
    assert pairs[0]["origin"].endswith(":1") and pairs[0]["prompt"].endswith("\n\nAssistant:")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "arrow"])
def test_file_formats_agree(tmp_path, fmt):
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, ROWS)
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        table = pa.Table.from_pylist(ROWS)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    pairs = load_pairs(str(path))
    assert [(p["chosen"], p["rejected"], p["strength"]) for p in pairs] == [("Hello!", "Go away.", 2.0),
                                                                              ("4", "5", None)]


def test_custom_keys(tmp_path):
    rows = [{"q": "x", "good": "a", "bad": "b"}]
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), prompt_key="q", chosen_key="good", rejected_key="bad")
    assert pairs[0]["chosen"] == "a"


def test_missing_key_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], {"prompt": "x", "chosen": "a"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing field 'rejected'"):
        load_pairs(path)


def test_malformed_json_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: malformed JSON"):
        load_pairs(str(path))


def test_non_string_response(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": 5, "rejected": "b"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'chosen' must be a string"):
        load_pairs(path)


def test_bad_strength(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "b", "strength": "lots"}])
    with pytest.raises(DataError, match="strength"):
        load_pairs(path)


def test_empty_response_is_a_counted_logged_skip(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], {"prompt": "x", "chosen": "  ", "rejected": "b"}])
    with caplog.at_level("WARNING"):
        pairs = load_pairs(path)
    assert len(pairs) == 1
    assert "1 pair(s) skipped: empty 'chosen' response" in caplog.text


def test_zero_usable_pairs(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "", "rejected": "b"}])
    with pytest.raises(DataError, match="zero usable pairs"):
        load_pairs(path)


def test_missing_file_is_clear():
    with pytest.raises(FileNotFoundError, match="data file not found: nope/x.jsonl"):
        load_pairs("nope/x.jsonl")


def test_split_is_deterministic_and_disjoint():
    pairs = [{"i": i, "prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(100)]  # normalized pairs
    a_train, a_val = split_pairs(pairs, 0.1, 7)
    b_train, b_val = split_pairs(pairs, 0.1, 7)
    assert a_val == b_val and len(a_val) == 10 and len(a_train) == 90
    assert not {p["i"] for p in a_val} & {p["i"] for p in a_train}


def test_eval_specs():
    assert parse_eval_specs(["hhh=/a/b.jsonl", "/c/oasst.pairs.jsonl"]) == [("hhh", "/a/b.jsonl"),
                                                                            ("oasst", "/c/oasst.pairs.jsonl")]


def test_encoder_truncation_keeps_response_end(minilm_path, caplog):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path)
    enc = PairTokenizer(tok, max_length=24)
    long_prompt = "\n\nHuman: " + "tell me a very long story about cats " * 20 + "\n\nAssistant:"
    with caplog.at_level("WARNING"):
        out = enc.encode_pairs([{"prompt": long_prompt, "chosen": "no thanks, here is the end", "rejected": "sure",
                                 "strength": None, "origin": "t:1"}])
    ids = out[0]["chosen_ids"]
    assert len(ids) == 24 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids[out[0]["chosen_start"]:-1]) == "no thanks, here is the end"
    assert "prompt cut from the left" in caplog.text


def test_response_longer_than_window_is_counted_skip(minilm_path, caplog):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path)
    kept = PairTokenizer(tok, max_length=10).encode_pairs(
        [{"prompt": "hi", "chosen": "word " * 40 + "end", "rejected": "b", "strength": None, "origin": "t:1"}])
    assert len(kept[0]["chosen_ids"]) == 10 and tok.decode(kept[0]["chosen_ids"][-2]) == "end"
    enc = PairTokenizer(tok, max_length=10, long_response="skip")
    pairs = [{"prompt": "hi", "chosen": "word " * 40, "rejected": "b", "strength": None, "origin": "t:1"},
             {"prompt": "hi", "chosen": "ok", "rejected": "b", "strength": None, "origin": "t:2"}]
    with caplog.at_level("WARNING"):
        out = enc.encode_pairs(pairs)
    assert len(out) == 1 and "1 pair(s) skipped: a response is longer than max_length=10" in caplog.text
    with pytest.raises(DataError, match="zero usable pairs after tokenization"):
        enc.encode_pairs(pairs[:1])


def test_llama_style_pad_equals_eos_reads_reward_at_last_real_token(smol_tokenizer_dir):
    """pad == eos (SmolLM2/Llama style): the reward token must be the last real token whatever the padding.

    Reading it at a pad position is the classic cause of reward models stuck at 50%.
    """
    from transformers import AutoTokenizer

    from aplot_rlhf.models.reward import RewardModel
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    assert tok.pad_token_id == tok.eos_token_id
    enc = PairTokenizer(tok, max_length=64)
    short = {"prompt": "Hi", "chosen": "ok", "rejected": "a much longer answer than the other one", "strength": None,
             "origin": "t:1"}
    batch = collate_pairs(enc.encode_pairs([short]), tok.pad_token_id)
    assert tok.padding_side == "right"

    class Stub(torch.nn.Module):  # only the index rule is under test here; the model is exercised elsewhere
        config = type("C", (), {"pad_token_id": tok.pad_token_id})()
        score = None
    idx = RewardModel(Stub()).reward_token_index(batch["input_ids"])
    lengths = batch["attention_mask"].sum(1) - 1
    assert idx.tolist() == lengths.tolist()


def test_chat_messages_use_the_template(smol_tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    rows = [{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
             "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye"}]}]
    from aplot_rlhf.data.pairs import normalize_record
    pair = normalize_record(rows[0], "t:1", prompt_key="prompt")
    assert pair["prompt"] == [{"role": "user", "content": "Hi"}]
    out = PairTokenizer(tok, max_length=64).encode_pairs([pair])
    text = tok.decode(out[0]["chosen_ids"])
    assert "<|im_start|>assistant\nHello there<|im_end|>" in text
    assert tok.decode(out[0]["chosen_ids"][out[0]["chosen_start"]:]).startswith("Hello there")


def test_sampler_is_resumable_and_rank_disjoint():
    s0, s1 = PairSampler(20, 3, 2, 0, seed=1), PairSampler(20, 3, 2, 1, seed=1)
    assert s0.batches_per_rank == 3
    e0, e1 = s0.epoch_batches(0), s1.epoch_batches(0)
    assert not {i for b in e0 for i in b} & {i for b in e1 for i in b}
    assert e0 == PairSampler(20, 3, 2, 0, seed=1).epoch_batches(0) and e0 != s0.epoch_batches(1)


def _epoch_pairs(n, mbs, world, seed, epoch, lengths=None):
    """Per rank, the epoch's micro-batches; plus every index the epoch touches over all ranks."""
    per_rank = [PairSampler(n, mbs, world, r, seed, lengths).epoch_batches(epoch) for r in range(world)]
    return per_rank, [i for batches in per_rank for b in batches for i in b]


@pytest.mark.parametrize("n,mbs,world", [(203, 4, 2), (1600, 16, 1), (37, 5, 1)])
def test_length_grouping_sees_the_same_pairs_and_pads_less(n, mbs, world):
    lengths = [random.Random(i).randint(5, 128) for i in range(n)]
    for epoch in (0, 1):
        plain, plain_all = _epoch_pairs(n, mbs, world, 3, epoch)
        grouped, grouped_all = _epoch_pairs(n, mbs, world, 3, epoch, lengths)
        assert len(grouped_all) == len(set(grouped_all)) == len(plain_all)  # no pair twice, none lost
        assert set(grouped_all) == set(plain_all)  # exactly the pairs the ungrouped epoch sees (same tail dropped)
        assert all(len(b) == mbs for batches in grouped for b in batches)
        # a global micro-batch pads to its longest pair: grouping must cut that
        pad = lambda per_rank: sum(max(lengths[i] for r in per_rank for i in r[b])  # noqa: E731
                                   for b in range(len(per_rank[0])))
        assert pad(grouped) < 0.9 * pad(plain), (pad(grouped), pad(plain))
    assert _epoch_pairs(n, mbs, world, 3, 0, lengths)[0] != _epoch_pairs(n, mbs, world, 3, 1, lengths)[0]
    assert _epoch_pairs(n, mbs, world, 3, 0, lengths)[0] != _epoch_pairs(n, mbs, world, 4, 0, lengths)[0]


def test_length_grouping_resumes_at_the_same_micro_batch():
    lengths = [random.Random(i).randint(5, 128) for i in range(300)]
    run = PairSampler(300, 8, 2, 1, seed=5, lengths=lengths)
    # a restarted process builds a new sampler and indexes the epoch by the saved micro step
    seen = [b for e in (0, 1) for b in run.epoch_batches(e)]
    restarted = PairSampler(300, 8, 2, 1, seed=5, lengths=list(lengths))
    per_epoch = restarted.batches_per_rank
    assert [restarted.epoch_batches(k // per_epoch)[k % per_epoch] for k in range(7, 2 * per_epoch)] == seen[7:]
    with pytest.raises(ValueError, match="lengths"):
        PairSampler(300, 8, 2, 1, seed=5, lengths=lengths[:-1])
