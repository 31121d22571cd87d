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
