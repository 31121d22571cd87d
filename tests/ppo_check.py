"""Run under torchrun by tests/test_ppo.py: a few PPO iterations, then check the generation engine
against the DeepSpeed actor. Writes one JSON file per rank (output_dir/ppo_check_rank{rank}.json):
rewards per iteration and whether greedy tokens from the rollout backend equal HF greedy decoding on
the gathered actor weights."""
import json
import os
import sys

from aplot_rlhf.config import PPOConfig, load_config
from aplot_rlhf.rollout.hf import HFRollout
from aplot_rlhf.trainers.ppo import PPOTrainer


def main():
    cfg = load_config(PPOConfig, sys.argv[1:])
    trainer = PPOTrainer(cfg).setup()
    sampled_seeds = []
    generate = trainer.backend.generate

    def recording_generate(prompts, **kw):  # the seeds each sampled prompt got (greedy calls excluded)
        if kw["temperature"] > 0:
            sampled_seeds.extend(kw["seeds"] if "seeds" in kw else [kw["seed"] + i for i in range(len(prompts))])
        return generate(prompts, **kw)

    trainer.backend.generate = recording_generate
    try:
        trainer.train()  # iterations, checkpoints, and the final export of the policy
        with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as fh:
            rows = [json.loads(line) for line in fh]
        by_step = {r["step"]: r for r in rows}  # one row per iteration (a resume drops rows past its checkpoint)
        rewards = [by_step[k]["ppo/reward/raw_mean"] for k in sorted(by_step)]
        syncs = [by_step[k]["ppo/sync_s"] for k in sorted(by_step)]
        prompts = [p[0] for p in trainer.eval_prompts]
        engine_tokens = trainer.generate(prompts, temperature=0.0)
        # greedy over the tokenizer's tokens, as the rollout engines sample (padded embedding rows banned)
        reference = HFRollout(trainer.actor.module, trainer.tok, zero3=trainer.zero3,
                              banned_token_ids=trainer.padded_ids)
        # the frozen KL reference still holds the starting weights after training (not the actor's)
        # (read from the file itself: under ZeRO-3 from_pretrained would partition a fresh copy)
        from safetensors.torch import load_file

        from aplot_rlhf.engine import deepspeed as ds_api
        start = load_file(os.path.join(cfg.actor_model, "model.safetensors"))
        if trainer.reference is None:  # LoRA: the reference is the actor's frozen base weights, adapters aside
            from aplot_rlhf.models.lora import hf_name
            ref_params = {hf_name(n): p for n, p in trainer.actor.module.named_parameters() if ".lora_" not in n}
        else:
            ref_module = getattr(trainer.reference, "module", trainer.reference)
            ref_params = dict(ref_module.named_parameters())
        assert set(start) <= set(ref_params), sorted(set(start) - set(ref_params))[:5]
        with ds_api.gathered_params(list(ref_params.values()), enabled=trainer.zero3):
            ref_diff = max((ref_params[k].detach().float().cpu() - v.float()).abs().max().item()
                           for k, v in start.items())
        hf_tokens = reference.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=0.0, top_p=1.0,
                                       seeds=[0] * len(prompts))
        import gc

        from aplot_rlhf.models.policy import Critic
        # built anywhere in this process (type(), not isinstance: a dead weak proxy in the heap raises on isinstance)
        critics = sum(type(o) is Critic for o in gc.get_objects())
        result = {"rank": trainer.rank, "rewards": rewards, "sync_s": syncs, "backend": trainer.backend.name,
                  "greedy_equal": engine_tokens == hf_tokens, "reference_max_diff": ref_diff,
                  "n_prompts": len(prompts), "sample_seeds": sampled_seeds, "engine": engine_tokens[:2],
                  "hf": hf_tokens[:2], "critic_objects": critics, "has_critic": trainer.critic is not None,
                  "checkpointed": sorted(trainer.trained_engines)}
        # one file per rank: the ranks' stdout lines can interleave under torchrun
        with open(os.path.join(cfg.output_dir, f"ppo_check_rank{trainer.rank}.json"), "w") as fh:
            json.dump(result, fh)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
