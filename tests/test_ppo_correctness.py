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
        if isinstance(v, bool):
            flags.append(f"--{k}" if v else f"--no-{k}")
        else:
            flags += [f"--{k}", *map(str, v if isinstance(v, list) else [v])]
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
    assert trainer.rewards.sources[0](["x"], ["eee"]).device == comm.device()


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


@pytest.mark.parametrize("model,lora", [
    ("dropout_llama_dir", {"lora_rank": 4}),
    # what the --lora_dropout help advised before issue 25 (--no-disable_dropout; this Llama has no other dropout)
    ("char_llama_dir", {"lora_rank": 4, "lora_dropout": 0.1, "disable_dropout": False}),
])
def test_first_mini_batch_ratio_is_exactly_one_with_lora_after_an_update(model, lora, prompt_file, tmp_path,
                                                                         trainer_factory, request):
    """Issue 25 item 3. At iteration 1 the adapters' B is 0 and their dropout changes nothing; after one
    update it does, and train-mode log-probs drift from the rollout's (approx KL 5.7e-6 here, 3.3e-4 on
    the issue's model, at lora_dropout 0.1). Every LoRA config PPO accepts must give a first ratio of
    exactly 1 at iteration 2; the others are refused at start, naming --lora_dropout."""
    from aplot_rlhf.errors import ConfigError
    try:
        cfg = ppo_config(request.getfixturevalue(model), prompt_file, tmp_path, **lora)
    except ConfigError as exc:
        assert "--lora_dropout" in str(exc)
        return
    trainer = trainer_factory(cfg)
    trainer.step()  # iteration 1: one optimizer step moves the adapters off B = 0
    trainer.step()
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
    hf = trainer.rewards.sources[0].model.hf
    hook = hf.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()),
                                        with_kwargs=True)
    try:
        trainer.rewards.sources[0]([rm_prompt], ["yes, it is red."])
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
    mean, std = trainer.rewards.sources[0].mean, trainer.rewards.sources[0].std
    assert abs(mean) > 1e-3 and abs(std - 1.0) > 1e-3  # a real offset and scale to fold in
    ids, _ = trainer.rewards.sources[0].encode([CHAT_PAIRS[1]["prompt"]], ["yes, it is blue."])[0]
    ids = torch.tensor([ids])
    with torch.no_grad():
        value = trainer.critic.module(ids, torch.ones_like(ids))[0, -1].item()
        raw = trainer.rewards.sources[0]([CHAT_PAIRS[1]["prompt"]], ["yes, it is blue."])[0].item()
    assert value == pytest.approx((raw - mean) / std, abs=1e-4), (value, raw, mean, std)


def test_a_reward_model_is_normalized_by_its_own_statistics_before_the_weighted_sum(chat_rm_dir, tiny_llama_dir,
                                                                                    prompt_file, tmp_path,
                                                                                    trainer_factory):
    fn = tmp_path / "count.py"
    fn.write_text("def letters(prompts, responses, **fields):\n    return [sum(c.isalpha() for c in r) / 10 "
                  "for r in responses]\n")
    trainer = trainer_factory(ppo_config(tiny_llama_dir, prompt_file, tmp_path, prompt_format="chat",
                                         reward_model=[f"rm={chat_rm_dir}", f"python:{fn}:letters"],
                                         reward_weights=[0.5, 2.0]))
    rm = trainer.rewards.sources[0]
    assert trainer.rewards.model is None  # two sources: the critic starts from the actor
    assert abs(rm.mean) > 1e-3 and abs(rm.std - 1.0) > 1e-3
    prompt, text = CHAT_PAIRS[1]["prompt"], "yes, it is blue."
    raw, norm, per = trainer.score([prompt], [trainer.tok.encode(text, add_special_tokens=False)],
                                   [{"origin": "chat:1", "fields": {}}])
    alone = rm([prompt], [text])[0].item()
    assert per[:, 0].tolist() == pytest.approx([alone, 1.1], abs=1e-6)
    assert raw.item() == pytest.approx(0.5 * alone + 2.0 * 1.1, abs=1e-5)
    assert norm.item() == pytest.approx(0.5 * (alone - rm.mean) / rm.std + 2.0 * 1.1, abs=1e-5)


def test_the_reward_model_scores_a_prompts_responses_with_one_forward_of_it(chat_rm_dir, tiny_llama_dir,
                                                                           prompt_file, tmp_path, trainer_factory):
    """--share_prompt: PPO's reward model (a decoder) reads K responses to one prompt in prompt-shared rows;
    its scores equal the padded batches'."""
    trainer = trainer_factory(ppo_config(tiny_llama_dir, prompt_file, tmp_path, reward_model=chat_rm_dir,
                                         critic_init="actor", prompt_format="chat", share_prompt=True))
    rm = trainer.rewards.sources[0]
    assert rm.shared
    prompts = [CHAT_PAIRS[0]["prompt"]] * 3 + [CHAT_PAIRS[1]["prompt"]] * 2
    texts = ["yes, it is red.", "no", "perhaps it is red, or blue, or green.", "yes, it is blue.", ""]
    shared = rm(prompts, texts)
    rm.shared = False
    try:
        padded = rm(prompts, texts)
    finally:
        rm.shared = True
    assert torch.allclose(shared, padded, atol=1e-5), (shared, padded)
    assert padded.unique().numel() == len(texts)  # five different scores: a misplaced read would show


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


def test_hf_backend_samples_the_full_tempered_distribution(tmp_path):
    """Issue 25 item 5. The HF backend draws from softmax(logits / T) and nothing else: no top-k (transformers fills in
    top_k=50 when the model's generation config has none, as SmolLM2's has not), and none of the model's
    own generation_config filters or penalties (min_p, typical_p, repetition_penalty, ...).

    A tiny Llama over 256 tokens with spread-out logits samples ~1000 tokens at T=0.7. Two checks against
    the model's own tempered probabilities at each sampled position: the share of tokens outside that
    position's 50 most likely ones (a top-k of 50 makes it 0), and the probability integral transform
    (each token's place in the sorted tempered distribution, jittered: uniform on [0, 1] if and only if
    the sampler draws from that distribution) with a Kolmogorov-Smirnov test."""
    from types import SimpleNamespace

    from scipy import stats
    from transformers import LlamaConfig, LlamaForCausalLM

    from aplot_rlhf.rollout.hf import HFRollout
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                         bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # logits with a spread of ~1: a real tail beyond the top 50
    # a generation config as hub models ship them: sampling filters and penalties of their own, no top_k
    model.generation_config.update(repetition_penalty=1.3, min_p=0.05, typical_p=0.9, no_repeat_ngram_size=2)
    backend = HFRollout(model, SimpleNamespace(pad_token_id=0, eos_token_id=1), zero3=False)
    T, n_rows = 0.7, 64
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (6,), generator=gen).tolist() for _ in range(n_rows)]
    responses = backend.generate(prompts, max_new_tokens=16, temperature=T, top_p=1.0, seeds=[7])
    outside, expected_outside, var_outside, pit = 0, 0.0, 0.0, []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:len(p) + len(r) - 1].double()
            probs = torch.softmax(logits / T, -1)
            order = probs.argsort(-1, descending=True)
            rank = (order == torch.tensor(r)[:, None]).long().argmax(-1)  # 0 = most likely
            outside += int((rank >= 50).sum())
            mass_out = 1.0 - probs.gather(-1, order[:, :50]).sum(-1)
            expected_outside += float(mass_out.sum())
            var_outside += float((mass_out * (1 - mass_out)).sum())
            sorted_p = probs.gather(-1, order)
            p_token = sorted_p.gather(-1, rank[:, None])[:, 0]
            before = torch.cumsum(sorted_p, -1).gather(-1, rank[:, None])[:, 0] - p_token
            pit += (before + torch.rand(len(r), generator=gen, dtype=torch.float64) * p_token).tolist()
    n = len(pit)
    assert n > 500 and expected_outside > 0.2 * n, (n, expected_outside)
    assert abs(outside - expected_outside) < 4 * var_outside ** 0.5 + 1, \
        f"{outside} of {n} sampled tokens outside the top 50, expected {expected_outside:.1f}"
    p_value = stats.kstest(pit, "uniform").pvalue
    assert p_value > 1e-3, f"sampled tokens are not drawn from the tempered distribution: KS p = {p_value:.2g}"
    # greedy (evaluation) is the argmax chain: the model's repetition penalty and n-gram ban are off too
    greedy = backend.generate([prompts[0]], max_new_tokens=12, temperature=0.0, top_p=1.0, seeds=[0])[0]
    ids = list(prompts[0])
    with torch.no_grad():
        for _ in greedy:
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy == ids[len(prompts[0]):]


# ------------------------------------------------------------------------------ issue 25 item 4: aggregation

@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "seq_mean_token_sum_norm"])
def test_two_micro_batches_give_the_gradient_of_one_batch(aggregation, char_llama_dir, prompt_file, tmp_path,
                                                          trainer_factory):
    """A mini-batch of 4 sequences as one micro-batch of 4, or as two micro-batches of 2 with different
    token counts (DeepSpeed accumulating them, dividing by 2): the same actor and critic gradients.
    Before issue 25 each micro-batch was its own token mean and DeepSpeed averaged the two, so a token of
    the shorter micro-batch weighed more. ZeRO-0 in fp32 so the gradients are in `.grad`; the optimizer
    step is skipped to read them. What one process cannot show: the average over ranks (the same
    arithmetic, undone with the world size)."""
    from aplot_rlhf.trainers.ppo import MINIBATCH_SEED_STRIDE
    grads, exp = {}, None
    for mbs in (4, 2):
        cfg = ppo_config(char_llama_dir, prompt_file, tmp_path / f"mbs{mbs}", micro_batch_size=mbs, zero_stage=0,
                         precision="fp32", loss_aggregation=aggregation, entropy_coef=0.01)
        trainer = trainer_factory(cfg)
        if exp is None:
            exp = first_rollout(trainer)
            order = torch.randperm(4, generator=torch.Generator().manual_seed(cfg.seed * MINIBATCH_SEED_STRIDE))
            mask = exp["mask"].clone()
            mask[order[0], 3:] = 0  # as if that response had ended at EOS after 3 tokens
            exp["mask"] = exp["loss_mask"] = mask
            tokens = [int(mask[order[i:i + 2]].sum()) for i in (0, 2)]
            assert tokens[0] != tokens[1], tokens  # the case that tells the two normalizations apart
        for engine in (trainer.actor, trainer.critic):
            engine.zero_grad()
            engine.step = lambda *a, **k: None
        trainer.train_on(exp)
        grads[mbs] = {f"{role}.{name}": p.grad.clone() for role, engine in (("actor", trainer.actor),
                                                                             ("critic", trainer.critic))
                      for name, p in engine.module.named_parameters() if p.grad is not None}
    assert grads[4].keys() == grads[2].keys() and len(grads[4]) > 10
    worst = max(grads[4], key=lambda k: (grads[4][k] - grads[2][k]).abs().max())
    diff = (grads[4][worst] - grads[2][worst]).abs().max().item()
    assert diff < 1e-6, f"{worst}: gradients differ by {diff:.3g} (scale {grads[4][worst].abs().max().item():.3g})"


@pytest.mark.distributed
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_sum_norm"])
def test_two_ranks_give_the_gradient_of_one_batch(aggregation, char_llama_dir, prompt_file, tmp_path):
    """The mini-batch of 4 sequences in one process, or split over 2 ranks whose token counts differ
    (DeepSpeed averaging their gradients): the same gradients (tests/ppo_grad_check.py)."""
    exp = tmp_path / "exp.pt"

    def grads(world, **sizes):
        out = tmp_path / f"world{world}"
        args = {"actor_model": char_llama_dir, "reward_model": "rule:char_frac:e", "prompt_data": prompt_file,
                "eval_prompts": 2, "rollout_backend": "hf", "max_new_tokens": 8, "max_prompt_length": 32,
                "zero_stage": 0, "precision": "fp32", "seed": 5, "prompt_format": "text", "output_dir": str(out),
                "loss_aggregation": aggregation, "entropy_coef": 0.01, "warmup_ratio": 0.0, **sizes}
        flags = [f for k, v in args.items() for f in (f"--{k}", str(v))] + ["--no-progress", "--no-tensorboard",
                                                                            "--no-export"]
        launch = ([PYTHON] if world == 1 else
                  [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())])
        # a process group of its own: not the variables an in-process trainer of this module may have set
        env = {k: v for k, v in python_env().items() if k not in DIST_VARS}
        proc = subprocess.run(launch + [str(REPO / "tests" / "ppo_grad_check.py"), str(exp), *flags],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        return torch.load(out / f"grads_world{world}.pt")

    one = grads(1, rollout_batch_size=4, ppo_mini_batch_size=4, micro_batch_size=4)
    two = grads(2, rollout_batch_size=2, ppo_mini_batch_size=2, micro_batch_size=2)
    assert one.keys() == two.keys() and len(one) > 10
    worst = max(one, key=lambda k: (one[k] - two[k]).abs().max())
    diff = (one[worst] - two[worst]).abs().max().item()
    assert diff < 1e-6, f"{worst}: gradients differ by {diff:.3g} (scale {one[worst].abs().max().item():.3g})"


# ------------------------------------------------------------------------------ issue 25 item 2: rollout mismatch

@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_rollout_logprobs_are_compared_every_iteration_and_weigh_the_loss(mode, char_llama_dir, prompt_file, tmp_path,
                                                                          trainer_factory):
    """The HF backend reports its sampled tokens' log-probs; an iteration logs the mismatch with the trainer's
    (small: same weights, KV-cached vs full forward), and the experience carries the --rollout_is weights
    (rollout_is_weights of the trainer's and the engine's log-probs), which the policy loss reads."""
    from aplot_rlhf.trainers.ppo_math import rollout_is_weights
    trainer = trainer_factory(ppo_config(char_llama_dir, prompt_file, tmp_path, rollout_is=mode, rollout_is_cap=2.0))
    metrics = trainer.step()
    assert 0 < metrics["rollout/logprob_abs_diff_mean"] <= metrics["rollout/logprob_abs_diff_max"] < 1e-3, metrics
    assert metrics["rollout/logprob_mismatch_frac"] == 0.0
    batch = trainer.prompt_batch(1)
    prompts, rm_prompts = [b[0] for b in batch], [b[1] for b in batch]
    responses, engine_lp = trainer.generate(prompts, seeds=[3] * len(prompts), return_logprobs=True)
    assert [len(r) for r in responses] == [len(lp) for lp in engine_lp]
    shifted = [[lp + 0.9 * (t % 2) for t, lp in enumerate(row)] for row in engine_lp]  # every other token: r ~ 0.4
    exp = trainer.make_experience(prompts, rm_prompts, responses, shifted)
    weights, loss_mask = rollout_is_weights(exp["old_lp"], exp["rollout_lp"], exp["mask"], mode, 2.0)
    assert torch.equal(exp["is_w"], weights) and torch.equal(exp["loss_mask"], loss_mask)
    odd = exp["mask"].bool() & (torch.arange(exp["mask"].shape[1]) % 2 == 1)
    assert odd.any() and (exp["is_w"][odd] < 0.45).all()
    assert (exp["loss_mask"][odd] == 0).all() if mode == "mask" else torch.equal(exp["loss_mask"], exp["mask"])
    trainer.train_on(exp)


# ------------------------------------------------------------------------------ issue 25 item 8: one disable_adapter

@pytest.mark.parametrize("layout", ["padded", "packing", "share_prompt"])
def test_lora_reference_logprobs_run_under_one_disable_adapter_per_experience(layout, char_llama_dir, prompt_file,
                                                                              tmp_path, trainer_factory, monkeypatch):
    """A LoRA actor is its own KL reference with the adapters disabled: an experience pass of 2 micro-batches
    enters disable_adapter() once (not once per micro-batch), and the reference log-probs are those of the
    base model (adapters moved off zero first, so they differ from the actor's)."""
    import contextlib

    from aplot_rlhf.trainers.ppo_layout import response_logprobs, trim_left_padding
    trainer = trainer_factory(ppo_config(char_llama_dir, prompt_file, tmp_path, lora_rank=4, lora_alpha=8,
                                         micro_batch_size=2, kl_mode="loss",
                                         skip_unmoved_old_logprobs=False,  # the actor's own experience forward
                                         **({layout: True} if layout != "padded" else {})))
    assert trainer.layout_kind == {"padded": "padded", "packing": "packed", "share_prompt": "shared"}[layout]
    peft_model = trainer.actor.module
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    real, entries = peft_model.disable_adapter, []

    @contextlib.contextmanager
    def counting():
        entries.append(1)
        with real():
            yield
    monkeypatch.setattr(peft_model, "disable_adapter", counting)
    exp = first_rollout(trainer)
    assert exp["ids"].shape[0] == 4 and len(entries) == 1, entries
    with torch.no_grad(), real():
        base = response_logprobs(trainer.actor, *trim_left_padding(exp["ids"], exp["attn"], exp["posids"]),
                                 exp["tokens"], vocab_size=trainer.vocab_size)
    mask = exp["mask"].bool()
    torch.testing.assert_close(exp["ref_lp"][mask], base[mask], rtol=1e-4, atol=1e-4)
    assert (exp["old_lp"] - exp["ref_lp"])[mask].abs().max() > 1e-3


# ------------------------------------------------------------------------------ issue 24: --share_prompt

@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_share_prompt_trainer_matches_the_padded_trainer(estimator, char_llama_dir, prompt_file, tmp_path,
                                                         trainer_factory, caplog):
    """The same rollout (2 prompts x 2 samples) through a padded trainer and a --share_prompt trainer: the same
    log-probs, reference log-probs and values in make_experience, and the same actor and critic gradients in
    train_on (ZeRO-0 fp32, the optimizer step skipped to read them). A flash-attention trainer falls back."""
    import logging

    from aplot_rlhf.models.packing import shared_attention_support
    trainers, grads = {}, {}
    for share in (False, True):
        cfg = ppo_config(char_llama_dir, prompt_file, tmp_path / f"share{share}", samples_per_prompt=2,
                         rollout_batch_size=2, advantage_estimator=estimator, zero_stage=0, precision="fp32",
                         kl_mode="loss", entropy_coef=0.01, share_prompt=share,
                         skip_unmoved_old_logprobs=False)  # the experience pass's own actor forward is compared
        trainers[share] = trainer = trainer_factory(cfg)
        if trainer.critic is not None:  # values off zero (the actor-initialized head starts at 0)
            torch.manual_seed(3)
            with torch.no_grad():
                trainer.critic.module.value_head.weight.normal_(0, 0.1)
    assert trainers[False].layout_kind == "padded" and trainers[True].layout_kind == "shared"
    batch = [b for b in trainers[False].prompt_batch(0) for _ in range(2)]
    prompts, rm_prompts = [b[0] for b in batch], [b[1] for b in batch]
    responses = trainers[False].generate(prompts, seeds=[1, 2, 3, 4])
    exps = {share: t.make_experience(prompts, rm_prompts, responses) for share, t in trainers.items()}
    mask = exps[False]["mask"].bool()
    for key in ("old_lp", "ref_lp") + (("old_values",) if estimator == "gae" else ()):
        diff = (exps[False][key] - exps[True][key])[mask].abs().max().item()
        assert diff < 1e-5, (key, diff)
    for share, trainer in trainers.items():
        engines = [e for e in (trainer.actor, trainer.critic) if e is not None]
        for engine in engines:
            engine.zero_grad()
            engine.step = lambda *a, **k: None
        trainer.train_on(exps[False])
        grads[share] = {f"{i}.{n}": p.grad.clone() for i, e in enumerate(engines)
                        for n, p in e.module.named_parameters() if p.grad is not None}
    assert grads[False].keys() == grads[True].keys() and len(grads[False]) > 10
    scale = max(g.abs().max().item() for g in grads[False].values())
    diff = max((grads[False][k] - grads[True][k]).abs().max().item() for k in grads[False])
    assert diff < 1e-5 * scale, (diff, scale)
    # where no per-token mask can be given (flash attention) the trainer falls back, saying so once
    trainer = trainers[True]
    flash = type("Config", (), {"_attn_implementation": "flash_attention_2"})()
    assert shared_attention_support(flash)
    with caplog.at_level(logging.WARNING):
        kind, _ = trainer._layout_kind([type("Model", (), {"config": flash})()])
    assert kind == "padded" and "falling back to the padded layout" in caplog.text


# ------------------------------------------------------------------------------ issue 24 item 3: the unmoved forward

@pytest.mark.parametrize("extra", [
    {"advantage_estimator": "grpo", "samples_per_prompt": 2, "rollout_batch_size": 2, "kl_mode": "loss"},
    {"advantage_estimator": "gae", "kl_mode": "loss", "packing": True},
    {"advantage_estimator": "gae", "kl_coef": 0.0, "micro_batch_size": 2},
])
def test_old_logprobs_from_the_training_forward_change_nothing_but_the_forward_count(extra, char_llama_dir, prompt_file,
                                                                                      tmp_path, trainer_factory):
    """One PPO epoch over one mini-batch, no KL in the reward: the experience pass skips the actor's forward
    and the old log-probs are the training forward's, detached. The first iteration's losses, gradients and
    metrics equal those of the run that does the forward (--no-skip_unmoved_old_logprobs); the actor runs one
    forward fewer in the experience phase."""
    from aplot_rlhf.engine import distributed as comm
    runs = {}
    for skip in (True, False):
        cfg = ppo_config(char_llama_dir, prompt_file, tmp_path / f"skip{skip}", zero_stage=0, precision="fp32",
                         skip_unmoved_old_logprobs=skip, **extra)
        trainer = trainer_factory(cfg)
        assert trainer.reuse_old_lp is skip
        phases = []
        hook = trainer.actor.module.register_forward_pre_hook(lambda *a: phases.append(comm.Phase.current))
        for engine in trainer.trained_engines.values():
            engine.zero_grad()
            engine.step = lambda *a, **k: None  # the gradients stay in .grad
        metrics = trainer.step()
        hook.remove()
        grads = {name: p.grad.clone() for name, p in trainer.actor.module.named_parameters() if p.grad is not None}
        runs[skip] = metrics, grads, phases
    (skipped, skipped_grads, skipped_phases), (full, full_grads, full_phases) = runs[True], runs[False]
    assert skipped_phases.count("experience") == 0 and full_phases.count("experience") > 0
    assert skipped_phases.count("train") == full_phases.count("train") > 0
    assert skipped.pop("old_logprobs_reused") == 1.0 and full.pop("old_logprobs_reused") == 0.0
    timings = ("gen_s", "gen_tokens_per_s", "experience_s", "train_s", "sync_s")
    assert skipped.keys() == full.keys()
    for k in skipped.keys() - set(timings):
        assert skipped[k] == pytest.approx(full[k], abs=1e-6), k
    assert skipped_grads.keys() == full_grads.keys() and len(skipped_grads) > 10
    for name in skipped_grads:
        torch.testing.assert_close(skipped_grads[name], full_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_old_logprobs_come_from_an_experience_forward_when_something_reads_them_first(char_llama_dir, prompt_file,
                                                                                      tmp_path, trainer_factory):
    """The KL in the reward or --rollout_is: the old log-probs are needed before the training forward, so the
    actor's experience forward runs over every row. Two epochs or two mini-batches: the policy moves after the
    first mini-batch, so every row but the first mini-batch's (which train_on fills) comes from it."""
    base = dict(zero_stage=0, precision="fp32")
    cases = {"kl in the reward": ({}, None), "rollout_is": ({"kl_mode": "loss", "rollout_is": "truncate"}, None),
             "two epochs": ({"kl_mode": "loss", "ppo_epochs": 2}, "first"),
             "two mini-batches": ({"kl_mode": "loss", "ppo_mini_batch_size": 2, "micro_batch_size": 2}, "first")}
    for i, (name, (extra, unmoved)) in enumerate(cases.items()):
        trainer = trainer_factory(ppo_config(char_llama_dir, prompt_file, tmp_path / str(i), **base, **extra))
        assert not trainer.reuse_old_lp and trainer.unmoved == unmoved, name
        batch = trainer.prompt_batch(0)
        prompts = [b[0] for b in batch]
        exp = trainer.make_experience(prompts, [b[1] for b in batch], *trainer.generate(prompts, return_logprobs=True))
        filled = torch.isfinite(exp["old_lp"]).all(1)
        later = sorted(set(range(len(prompts))) - set(trainer.unmoved_rows(len(prompts))))
        assert filled.nonzero()[:, 0].tolist() == later, name
        first = 0 if unmoved is None else min(trainer.cfg.ppo_mini_batch_size, len(prompts))
        assert len(later) == len(prompts) - first, name


@pytest.mark.parametrize("extra", [
    {"ppo_mini_batch_size": 2, "micro_batch_size": 1},  # two mini-batches: the policy moves after the first
    {"ppo_epochs": 2, "micro_batch_size": 2},  # two epochs: the second revisits the first mini-batch's rows
    {"advantage_estimator": "grpo", "samples_per_prompt": 2, "rollout_batch_size": 2, "ppo_mini_batch_size": 2,
     "micro_batch_size": 2, "share_prompt": True},
])
def test_first_mini_batch_old_logprobs_from_training_equal_the_experience_forward(extra, char_llama_dir, prompt_file,
                                                                                  tmp_path, trainer_factory):
    """Issue 24 item 3, the first mini-batch of the first epoch: its old log-probs come from its training
    forward (the actor has not stepped yet), every other row's from the experience forward. Two real
    iterations (the optimizer steps between mini-batches) give the same metrics and the same weights as the
    run that computes every old log-prob in the experience pass; a run that took the later mini-batches' old
    log-probs from training too (after the policy moved) would show ratio 1 and no clipping there."""
    from aplot_rlhf.engine import distributed as comm
    runs = {}
    for skip in (True, False):
        cfg = ppo_config(char_llama_dir, prompt_file, tmp_path / f"skip{skip}", zero_stage=0, precision="fp32",
                         kl_mode="loss", skip_unmoved_old_logprobs=skip, **extra)
        trainer = trainer_factory(cfg)
        assert trainer.unmoved == ("first" if skip else None)
        experience_rows = []
        hook = trainer.actor.module.register_forward_pre_hook(
            lambda mod, args, kwargs: experience_rows.append(kwargs["input_ids"].shape[0])
            if comm.Phase.current == "experience" else None, with_kwargs=True)
        metrics = [trainer.step() for _ in range(2)]
        hook.remove()
        weights = {name: p.detach().clone() for name, p in trainer.actor.module.named_parameters()}
        runs[skip] = metrics, weights, experience_rows
    (skipped, w_skip, rows_skip), (full, w_full, rows_full) = runs[True], runs[False]
    assert sum(rows_skip) < sum(rows_full)  # fewer rows through the actor in the experience pass
    for it, (a, b) in enumerate(zip(skipped, full)):
        assert 0 < a.pop("old_logprobs_reused") <= 1 and b.pop("old_logprobs_reused") == 0.0
        for k in a.keys() - {"gen_s", "gen_tokens_per_s", "experience_s", "train_s", "sync_s"}:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (it, k)
    assert any(m["clip_frac"] > 0 or m["approx_kl"] > 1e-8 for m in full)  # the policy moved within an iteration
    for name in w_skip:
        # Adam turns rounding-level gradient differences of near-zero gradients into up to ~3e-6 here; taking
        # a moved mini-batch's old log-probs from training would move weights on the scale of the lr (1e-3)
        torch.testing.assert_close(w_skip[name], w_full[name], rtol=1e-4, atol=2e-5, msg=name)
