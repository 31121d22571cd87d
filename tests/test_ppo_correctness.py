"""PPO correctness the review found missing: device invariant, dropout, sampling seeds, critic train mode,
the reward model's input format, the critic's starting scale, global whitening, log averaging.

The trainer runs in this process (one rank, DeepSpeed ZeRO-2 on CPU, HF rollouts), on tiny real models.
What a one-device machine cannot show: a CUDA index into a CPU tensor (item 1 of the review); the
invariant that prevents it is asserted where the experience is built and checked here instead.
"""
import json
import subprocess

import pytest
import torch

from helpers import CHARS, PYTHON, REPO, free_port, python_env

PROMPT_ROWS = [{"prompt": "\n\nHuman: " + w + "\n\nAssistant:"} for w in
               ("hello there", "what is rain", "tell me a joke", "how are you", "name a colour", "why is the sky",
                "good morning", "count to three", "say something", "what is a cat", "a b c", "one more")]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPT_ROWS))
    return str(path)


def _char_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture(scope="module")
def dropout_llama_dir(tmp_path_factory):
    """The character Llama with attention_dropout 0.1: a config float, read by the attention layers."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, attention_dropout=0.1)
    out = tmp_path_factory.mktemp("dropout_llama")
    LlamaForCausalLM(config).save_pretrained(out)
    _char_tokenizer().save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def dropout_gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 with every dropout at 0.1 (nn.Dropout modules and attn_pdrop)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=2, n_positions=256, bos_token_id=1,
                        eos_token_id=2, pad_token_id=2, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    out = tmp_path_factory.mktemp("dropout_gpt2")
    GPT2LMHeadModel(config).save_pretrained(out)
    _char_tokenizer().save_pretrained(out)
    return str(out)


def ppo_config(actor, prompt_file, out, **extra):
    from aplot_rlhf.config import PPOConfig, load_config
    args = {"actor_model": actor, "reward_model": "rule:char_frac:e", "prompt_data": prompt_file, "eval_prompts": 2,
            "rollout_backend": "hf", "rollout_batch_size": 4, "ppo_mini_batch_size": 4, "micro_batch_size": 4,
            "max_new_tokens": 8, "max_prompt_length": 32, "ppo_iterations": 2, "learning_rate": 1e-3,
            "warmup_ratio": 0.0, "lr_scheduler": "constant", "zero_stage": 2, "output_dir": str(out),
            "temperature": 1.0, "seed": 5, "prompt_format": "text", "critic_learning_rate": 1e-3, **extra}
    flags = []
    for k, v in args.items():
        flags += [f"--{k}" if v else f"--no-{k}"] if isinstance(v, bool) else [f"--{k}", str(v)]
    return load_config(PPOConfig, flags + ["--no-progress", "--no-tensorboard", "--no-export"])


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def trainer_factory():
    """Builds set-up PPO trainers in this process and closes them at the end of the module.

    They share one one-rank process group for the whole module: DeepSpeed caches its groups, so a group
    destroyed and created again inside one process is not usable by it."""
    from aplot_rlhf.engine import distributed as comm
    from aplot_rlhf.trainers.ppo import PPOTrainer
    made = []
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(free_port())}.items():
            mp.setenv(k, v)

        def make(cfg):
            trainer = PPOTrainer(cfg).setup()
            made.append(trainer)
            return trainer

        yield make
        for t in reversed(made):  # newest first: each restores the handler the one before it found
            t.preempt.restore()
            t.logger.close()
        comm.shutdown()


def first_rollout(trainer):
    batch = trainer.prompt_batch(0)
    prompts, rm_prompts = [b[0] for b in batch], [b[1] for b in batch]
    return trainer.make_experience(prompts, rm_prompts, trainer.generate(prompts))


# ------------------------------------------------------------------------------ 1. device invariant

def test_experience_tensors_are_checked_to_live_on_the_trainers_device(dropout_llama_dir, prompt_file, tmp_path,
                                                                       trainer_factory):
    from aplot_rlhf.engine import distributed as comm
    from aplot_rlhf.trainers.ppo import TRAIN_KEYS, experience_on
    with pytest.raises(RuntimeError, match=r"off the trainer's device.*'scores': 'meta'"):
        experience_on(torch.device("cpu"), ids=torch.zeros(2), scores=torch.zeros(2, device="meta"))
    trainer = trainer_factory(ppo_config(dropout_llama_dir, prompt_file, tmp_path))
    exp = first_rollout(trainer)
    tensors = {k: v for k, v in exp.items() if torch.is_tensor(v)}
    assert {k: v.device for k, v in tensors.items()} == {k: comm.device() for k in tensors}
    assert set(TRAIN_KEYS) <= set(exp)  # the mini-batch reads only these
    assert trainer.reward(["x"], ["eee"]).device == comm.device()


# ------------------------------------------------------------------------------ 2. dropout

@pytest.mark.parametrize("model", ["dropout_llama_dir", "dropout_gpt2_dir"])
def test_first_mini_batch_ratio_is_exactly_one_with_dropout_in_the_config(model, prompt_file, tmp_path,
                                                                          trainer_factory, request):
    from aplot_rlhf.trainers.ppo_layout import response_logprobs, trim_left_padding
    trainer = trainer_factory(ppo_config(request.getfixturevalue(model), prompt_file, tmp_path))
    exp = first_rollout(trainer)
    # the training forward of the same rows, in train mode, must reproduce the rollout's log-probs exactly
    trainer.actor.train()
    seqs = trim_left_padding(exp["ids"], exp["attn"], exp["posids"])
    with torch.no_grad():
        lp = response_logprobs(trainer.actor, *seqs, exp["tokens"], vocab_size=trainer.vocab_size)
    mask = exp["mask"].bool()
    assert torch.equal(lp[mask], exp["old_lp"][mask]), (lp - exp["old_lp"]).abs().max()
    trainer.train_on(exp)
    first = trainer.first_micro_batch_stats
    assert first["clip_frac"] == 0.0 and first["approx_kl"] == 0.0, first


def test_disable_dropout_zeroes_config_floats_and_modules(dropout_gpt2_dir):
    from transformers import AutoModelForCausalLM

    from aplot_rlhf.models.dropout import disable_dropout
    model = AutoModelForCausalLM.from_pretrained(dropout_gpt2_dir)
    assert disable_dropout(model) > 0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.attn_pdrop == model.config.resid_pdrop == model.config.embd_pdrop == 0.0


# ------------------------------------------------------------------------------ 4. seeds (HF backend)

def test_hf_backend_samples_differently_for_different_seeds(char_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aplot_rlhf.rollout.hf import HFRollout
    model = AutoModelForCausalLM.from_pretrained(char_llama_dir)
    backend = HFRollout(model, AutoTokenizer.from_pretrained(char_llama_dir), zero3=False)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]

    def sample(seed):
        torch.manual_seed(0)  # the global RNG is the same before each call: only the seed may differ
        return backend.generate(prompts, max_new_tokens=16, temperature=1.0, top_p=1.0, seeds=[seed, seed + 1])

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_sample_seeds_are_distinct_over_ranks_prompts_and_iterations():
    from aplot_rlhf.rollout.base import sample_seeds
    seeds = [s for it in range(3) for rank in range(2) for s in sample_seeds(42, it, rank, 2, 8)]
    assert len(seeds) == 48 and len(set(seeds)) == 48
    other_run = {s for it in range(3) for rank in range(2) for s in sample_seeds(43, it, rank, 2, 8)}
    assert not other_run & set(seeds)


# ------------------------------------------------------------------------------ 5. critic train mode

def test_gradient_checkpointing_recomputes_actor_and_critic_layers(char_llama_dir, prompt_file, tmp_path,
                                                                   trainer_factory):
    trainer = trainer_factory(ppo_config(char_llama_dir, prompt_file, tmp_path, gradient_checkpointing=True))
    exp = first_rollout(trainer)
    calls = {"actor": 0, "critic": 0}
    layers = {"actor": trainer.actor.module.model.layers[0], "critic": trainer.critic.module.backbone.layers[0]}
    # a pre-hook: non-reentrant checkpointing stops a recompute once it has what backward needs, before
    # the layer's forward hooks would run
    hooks = [layer.register_forward_pre_hook(lambda *_, role=role: calls.__setitem__(role, calls[role] + 1))
             for role, layer in layers.items()]
    try:
        trainer.train_on(exp)
    finally:
        for h in hooks:
            h.remove()
    micro_batches = trainer.cfg.ppo_epochs * trainer.cfg.rollout_batch_size // trainer.cfg.micro_batch_size
    # checkpointing: every layer runs once in the forward and once more, recomputed, in the backward
    assert calls == {"actor": 2 * micro_batches, "critic": 2 * micro_batches}, calls


# ------------------------------------------------------------------------------ 6 + 7. reward model

CHAT_PAIRS = [{"prompt": [{"role": "user", "content": f"question number {i}: is it {w}?"}],
               "chosen": [{"role": "assistant", "content": f"yes, it is {w}."}],
               "rejected": [{"role": "assistant", "content": "no idea, go away"}]}
              for i, w in enumerate(["red", "blue", "warm", "cold", "big", "small", "fast", "slow"] * 2)]


@pytest.fixture(scope="module")
def chat_rm_dir(tiny_llama_dir, tmp_path_factory):
    """A reward model trained by train_rm (one process, 2 steps) on chat-message pairs, exported."""
    root = tmp_path_factory.mktemp("chat_rm")
    data = root / "chat_pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_PAIRS))
    flags = {"model_name_or_path": tiny_llama_dir, "train_data": str(data), "output_dir": str(root / "run"),
             "max_length": 96, "micro_batch_size": 4, "max_steps": 2, "zero_stage": 0, "loss": "bt",
             "learning_rate": 1e-3, "eval_data": str(data), "eval_batch_size": 8}
    cmd = [PYTHON, "-m", "aplot_rlhf.cli.train_rm"] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    env = {k: v for k, v in python_env().items() if k not in DIST_VARS}  # its own one-process group
    proc = subprocess.run(cmd + ["--no-progress", "--no-tensorboard"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(root / "run" / "model")


def test_reward_model_in_ppo_sees_the_ids_train_rm_built(chat_rm_dir, tiny_llama_dir, prompt_file, tmp_path,
                                                         trainer_factory):
    from transformers import AutoTokenizer

    from aplot_rlhf.data.pair_tokenizer import PairTokenizer
    from aplot_rlhf.data.reading import SkipCounter
    trainer = trainer_factory(ppo_config(tiny_llama_dir, prompt_file, tmp_path, reward_model=chat_rm_dir,
                                         critic_init="actor", prompt_format="chat"))
    from aplot_rlhf.data.prompts import PromptFormatter
    prompt = CHAT_PAIRS[0]["prompt"]
    # the prompt as the PPO trainer passes it on (setup builds this formatter from the same flags)
    _, rm_prompt = PromptFormatter(trainer.tok, trainer.cfg.max_prompt_length, trainer.cfg.prompt_format)(prompt)
    seen = []
    hf = trainer.reward.model.hf
    hook = hf.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()),
                                        with_kwargs=True)
    try:
        trainer.reward([rm_prompt], ["yes, it is red."])
    finally:
        hook.remove()
    tok = AutoTokenizer.from_pretrained(chat_rm_dir)
    skips = SkipCounter()  # train_rm's encoder, as train_rm was run (max_length 96, defaults otherwise)
    expected, _ = PairTokenizer(tok, 96).encode(prompt, CHAT_PAIRS[0]["chosen"][0]["content"], skips)
    assert not skips.counts
    assert seen == [expected], (tok.decode(seen[0]), tok.decode(expected))


def test_critic_from_the_reward_model_starts_at_the_normalized_score(chat_rm_dir, tiny_llama_dir, prompt_file,
                                                                    tmp_path, trainer_factory):
    trainer = trainer_factory(ppo_config(tiny_llama_dir, prompt_file, tmp_path, reward_model=chat_rm_dir,
                                         critic_init="reward", prompt_format="chat"))
    mean, std = trainer.reward.mean, trainer.reward.std
    assert abs(mean) > 1e-3 and abs(std - 1.0) > 1e-3  # a real offset and scale to fold in
    ids, _ = trainer.reward.encode([CHAT_PAIRS[1]["prompt"]], ["yes, it is blue."])[0]
    ids = torch.tensor([ids])
    with torch.no_grad():
        value = trainer.critic.module(ids, torch.ones_like(ids))[0, -1].item()
        raw = trainer.reward([CHAT_PAIRS[1]["prompt"]], ["yes, it is blue."])[0].item()
    assert value == pytest.approx((raw - mean) / std, abs=1e-4), (value, raw, mean, std)


# ------------------------------------------------------------------------------ 9. log averaging

@pytest.mark.slow  # a whole training run in a subprocess
def test_ppo_log_row_is_the_mean_of_its_iterations(char_llama_dir, prompt_file, tmp_path, trainer_factory):
    rows = {}
    for log_steps in (1, 2):
        out = tmp_path / f"log{log_steps}"
        trainer = trainer_factory(ppo_config(char_llama_dir, prompt_file, out, log_steps=log_steps))
        trainer.train()
        rows[log_steps] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_iteration, averaged = rows[1], rows[2]
    assert [r["step"] for r in averaged] == [2]
    for key in ("ppo/reward/raw_mean", "ppo/policy_loss", "ppo/kl", "ppo/response_length"):
        mean = (per_iteration[0][key] + per_iteration[1][key]) / 2
        assert averaged[0][key] == pytest.approx(mean, abs=1e-6), key
