"""The reward-model server: a train_rm export behind HTTP (`python -m aplot_rlhf.cli.serve_rm`).

    POST /score   {"prompts": [str | chat messages], "responses": [str]} -> {"rewards": [float | null]}
    GET  /info    model, input format, reward mean/std, tokenizer, dtype, device, max length, packing, limits
    GET  /health  {"status": "ok"} (no token: for probes; the model is loaded before the port opens)

Scoring is PPO's in-process path: `rewards.encode_for_reward_model` (the tokenization train_rm's export
records; an empty response is scored as one space, as ModelReward scores it) and eval.py's forward (packed
where the model supports it, else padded). Requests that arrive while a forward runs wait in an asyncio
queue and are merged into the next forward, up to `max_batch_tokens` tokens; the forward runs in one worker
thread, off the event loop. Errors answer a 4xx/5xx status with {"error": message}.

Stack: FastAPI on Starlette, served by uvicorn. Both come with vLLM (its OpenAI server runs on them), so
the GPU and CPU install sets already hold them; uvicorn is the reference ASGI server (graceful shutdown on
SIGTERM, keep-alive, httptools), and FastAPI is a thin typed layer over Starlette that we use only for
routing: the body is read by hand so the size limit holds before any parsing.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .data.export_contract import encoder_from_export, export_reward_statistics
from .errors import ConfigError
from .eval import score_sequences, scoring_forward
from .models.dropout import disable_dropout
from .models.loader import load_model, load_tokenizer
from .rewards import encode_for_reward_model

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str) -> torch.device:
    """'auto': CUDA when torch sees a GPU, else the CPU (logged either way). A requested CUDA device that is
    not there is a ConfigError, never a silent CPU fallback."""
    if requested == "auto":
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        log.info("device: %s (auto: %s)", dev, "CUDA is available" if dev.type == "cuda"
                 else "torch sees no CUDA device; scoring on the CPU")
        return dev
    try:
        dev = torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(f"--device {requested!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: torch sees no CUDA device (torch {torch.__version__}, "
                              f"built for CUDA {torch.version.cuda}); pass --device cpu to score on the CPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)")
    log.info("device: %s (requested)", dev)
    return dev


class Scorer:
    """A train_rm export loaded for scoring: tokenize as PPO's ModelReward does, score with eval.py's forward.

    score(prompts, responses) -> [float]; encode(...) and score_encoded(...) are the two halves (the server
    tokenizes per request, then scores merged batches)."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", packing: str = "auto",
                 max_batch_tokens: int = 16384, allow_untrained_head: bool = False):
        self.path = path
        self.device = pick_device(device)
        if dtype == "auto":  # bf16 where a GPU runs it natively, else the fp32 train_rm evaluates in on a CPU
            dtype = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        self.dtype = dtype
        self.tok = load_tokenizer("served", path)
        hf = load_model("served", path, dtype=DTYPES[dtype], allow_untrained_head=allow_untrained_head)
        # PPO's ModelReward builds its encoder with exactly these arguments: every response gets a score
        self.encoder, self.input_format = encoder_from_export(self.tok, hf.config, long_response="keep_end")
        disable_dropout(hf)
        if hf.config.pad_token_id is None:
            hf.config.pad_token_id = self.tok.pad_token_id
        self.mean, self.std = export_reward_statistics(hf.config)
        self.hf = hf.to(self.device).eval()
        self.forward, self.pack = scoring_forward(self.hf, self.tok.pad_token_id, self.encoder.max_length, packing)
        self.max_batch_tokens = max_batch_tokens

    def info(self) -> dict:
        return {"model": os.path.abspath(self.path), "input_format": self.input_format,
                "reward_mean": self.mean, "reward_std": self.std,
                "tokenizer": type(self.tok).__name__, "vocab_size": len(self.tok),
                "dtype": self.dtype, "device": str(self.device), "max_length": self.encoder.max_length,
                "packing": self.pack is not None, "max_batch_tokens": self.max_batch_tokens,
                "empty_response": "scored as one space (as train_ppo's in-process reward model scores it)"}

    def encode(self, prompts: list, responses: list[str]) -> list[tuple[list[int], int]]:
        return encode_for_reward_model(self.encoder, self.input_format, prompts, responses)

    @torch.no_grad()
    def score_encoded(self, seqs: list[tuple[list[int], int]]) -> list[float]:
        """Rewards of encoded sequences, in order; forwards of at most max_batch_tokens tokens (a longer
        sequence alone)."""
        out, chunk, tokens = [], [], 0
        for seq in seqs + [None]:
            if chunk and (seq is None or tokens + len(seq[0]) > self.max_batch_tokens):
                out += score_sequences(self.forward, chunk, len(chunk), self.tok.pad_token_id, self.device,
                                       pack=self.pack).tolist()
                chunk, tokens = [], 0
            if seq is not None:
                chunk.append(seq)
                tokens += len(seq[0])
        return out

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        return self.score_encoded(self.encode(prompts, responses))


class Batcher:
    """Merges concurrent requests into forwards of at most max_batch_tokens tokens and max_batch_requests
    requests (0: no cap; 1: one request per forward). A request is never split across merged batches; one over
    the token budget runs alone (in several forwards). One worker thread runs them."""

    def __init__(self, scorer: Scorer, max_batch_tokens: int, max_batch_requests: int = 0):
        self.scorer, self.max_batch_tokens, self.max_batch_requests = scorer, max_batch_tokens, max_batch_requests
        self.queue: asyncio.Queue | None = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rm-forward")
        # one tokenizing thread: a fast tokenizer whose truncation is set per call is not safe to share
        self.tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rm-tokenize")
        self.forwards = self.requests = 0

    async def encode(self, prompts: list, responses: list[str]) -> list[tuple[list[int], int]]:
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer, self.scorer.encode, prompts,
                                                                responses)

    async def score(self, seqs: list[tuple[list[int], int]]) -> list[float]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((seqs, future))
        return await future

    async def run(self) -> None:
        self.queue = asyncio.Queue()
        loop, held = asyncio.get_running_loop(), None
        while True:
            batch = [held or await self.queue.get()]
            held, tokens = None, sum(len(s[0]) for s in batch[0][0])
            while not self.queue.empty() and len(batch) != self.max_batch_requests:
                # everything that arrived during the last forward, up to the budget
                item = self.queue.get_nowait()
                size = sum(len(s[0]) for s in item[0])
                if tokens + size > self.max_batch_tokens:
                    held = item
                    break
                batch.append(item)
                tokens += size
            batch = [(seqs, fut) for seqs, fut in batch if not fut.done()]  # a client that went away
            if not batch:
                continue
            seqs = [s for item, _ in batch for s in item]
            try:
                scores = await loop.run_in_executor(self.worker, self.scorer.score_encoded, seqs)
            except Exception as exc:  # every waiting request hears of it; the server keeps serving
                log.exception("forward of %d sequences failed", len(seqs))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.forwards += 1
            self.requests += len(batch)
            at = 0
            for item, fut in batch:
                if not fut.done():
                    fut.set_result(scores[at:at + len(item)])
                at += len(item)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_score_request(body: bytes) -> tuple[list, list[str]]:
    """{"prompts": [...], "responses": [...]} -> (prompts, responses), or RequestError 400 (not JSON) / 422
    (wrong shape). A prompt is a string or chat messages ([{"role", "content"}]); a response is a string."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not {"prompts", "responses"} <= set(data):
        raise RequestError(422, 'send a JSON object {"prompts": [...], "responses": [...]}')
    prompts, responses = data["prompts"], data["responses"]
    if not isinstance(prompts, list) or not isinstance(responses, list):
        raise RequestError(422, "prompts and responses must be lists")
    if len(prompts) != len(responses):
        raise RequestError(422, f"{len(prompts)} prompts for {len(responses)} responses: send one prompt per response")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise RequestError(422, f"responses[{i}] is {type(r).__name__}: every response must be a string")
    for i, p in enumerate(prompts):
        ok = isinstance(p, str) or (isinstance(p, list) and p and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in p))
        if not ok:
            raise RequestError(422, f"prompts[{i}] must be a string or a non-empty list of "
                                    '{"role": str, "content": str} messages')
    return prompts, responses


def build_app(scorer: Scorer, max_batch_tokens: int, max_body_bytes: int, api_key: str = "",
              max_batch_requests: int = 0):
    """The FastAPI app: /score (batched), /info, /health; a bearer token on /score and /info when api_key."""
    from contextlib import asynccontextmanager

    batcher = Batcher(scorer, max_batch_tokens, max_batch_requests)

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        for pool in (batcher.worker, batcher.tokenizer):
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="aplot_rlhf reward model", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher = batcher

    def error(status: int, message: str, **headers) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    def refused(request: Request) -> JSONResponse | None:
        if not api_key:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            return error(401, "missing or wrong bearer token (send Authorization: Bearer $APLOT_RM_API_KEY)",
                         **{"WWW-Authenticate": "Bearer"})
        return None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info(request: Request):
        return refused(request) or scorer.info() | {"max_body_bytes": max_body_bytes,
                                                    "max_batch_requests": max_batch_requests,
                                                    "forwards": batcher.forwards, "requests": batcher.requests}

    @app.post("/score")
    async def score(request: Request):
        if (no := refused(request)) is not None:
            return no
        too_big = error(413, f"request body over the server's limit of {max_body_bytes} bytes (--max_body_mb): "
                             "send fewer or shorter responses per request")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return too_big
        body = bytearray()
        async for chunk in request.stream():  # a chunked upload is counted as it arrives
            body += chunk
            if len(body) > max_body_bytes:
                return too_big
        try:
            prompts, responses = parse_score_request(bytes(body))
        except RequestError as exc:
            return error(exc.status, str(exc))
        if not responses:
            return {"rewards": []}
        t0 = time.perf_counter()
        try:
            seqs = await batcher.encode(prompts, responses)
        except Exception as exc:  # a prompt the chat template or tokenizer rejects: the client's input
            return error(422, f"tokenizing failed: {type(exc).__name__}: {exc}")
        try:
            rewards = await batcher.score(seqs)
        except Exception as exc:  # the forward failed (out of memory, say): a 5xx the client retries
            return error(500, f"scoring failed: {type(exc).__name__}: {exc}")
        log.debug("scored %d responses in %.3f s", len(rewards), time.perf_counter() - t0)
        # NaN/inf are not JSON: null, which the client turns back into NaN (PPO names the source and row)
        return {"rewards": [r if math.isfinite(r) else None for r in rewards]}

    return app


def serve(scorer: Scorer, host: str, port: int, max_batch_tokens: int, max_body_bytes: int, api_key: str = "",
          max_batch_requests: int = 0, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn finishes the requests in flight first)."""
    import uvicorn
    app = build_app(scorer, max_batch_tokens, max_body_bytes, api_key, max_batch_requests)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s without a token: anyone who reaches this port can query the model "
                    "(set APLOT_RM_API_KEY or --api_key)", host)
    log.info("serving %s on http://%s:%d (%s, %s, %s batches up to %d tokens)", scorer.path, host, port,
             scorer.device, scorer.dtype, "packed" if scorer.pack is not None else "padded", max_batch_tokens)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
