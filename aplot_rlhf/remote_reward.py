"""PPO's client of the reward-model server (`--reward_model http://HOST:PORT`, served by
`python -m aplot_rlhf.cli.serve_rm`).

Every rank posts its own responses. A connection error, a timeout (--reward_timeout_s per request) or a 5xx
is retried with exponential backoff until --reward_server_wait_s has passed in total, so a server that
restarts in the middle of a run costs that rollout a wait, not an iteration; after the last try the run stops
with one RewardError naming the URL, the attempts and the last error. A 4xx (401 token, 413 body too large,
422 bad input) is the request's own fault: not retried, the server's message in the error.

The bearer token is read from $APLOT_RM_API_KEY only (a flag would be saved in the run's config file).
httpx rather than urllib: one pooled keep-alive connection per rank, separate connect/read timeouts and
distinct exception classes for "no server" and "slow server" (it comes with vLLM and FastAPI).
"""
from __future__ import annotations

import logging
import math
import os
import time

import torch

from .engine import distributed as comm
from .errors import RewardError

log = logging.getLogger(__name__)

FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 10.0
RETRIED_4XX = (408, 429)  # request timeout, too many requests: the server's state, not the request's


class RemoteReward:
    """A reward model behind an HTTP server: source(prompts, responses, rows) -> raw scores [B] fp32."""

    in_process = False

    def __init__(self, url: str, name: str = "remote", timeout_s: float = 300.0, wait_s: float = 600.0):
        import httpx
        self.url, self.name = url.rstrip("/"), name
        self.timeout_s, self.wait_s = timeout_s, wait_s
        token = os.environ.get("APLOT_RM_API_KEY", "")
        self.client = httpx.Client(headers={"Authorization": f"Bearer {token}"} if token else {},
                                   timeout=httpx.Timeout(timeout_s or None, connect=min(timeout_s or 10.0, 10.0)))
        info = self._request("GET", "/info", None)  # waits for a server that is still starting
        self.info = info
        self.mean, self.std = info.get("reward_mean"), info.get("reward_std")
        log.info("reward %s: server %s serves %s (%s input, %s on %s, reward mean %s std %s)", name, self.url,
                 info.get("model"), info.get("input_format"), info.get("dtype"), info.get("device"), self.mean,
                 self.std)

    def _request(self, method: str, path: str, payload: dict | None) -> dict:
        """The server's JSON answer; retries transport errors, timeouts, 5xx (and 408/429) with backoff for
        wait_s in total; RewardError after the last try or on any other 4xx."""
        import httpx
        url = self.url + path
        deadline = time.monotonic() + self.wait_s
        attempts, backoff_s, last = 0, FIRST_BACKOFF_S, ""
        while True:
            attempts += 1
            try:
                r = self.client.request(method, url, json=payload)
            except httpx.TransportError as exc:  # refused, reset, timed out, cut off mid-answer
                last = f"{type(exc).__name__}: {exc or 'no detail'}"
            else:
                if r.status_code < 400:
                    if attempts > 1:
                        log.warning("reward %s: %s answers again after %d attempt(s)", self.name, url, attempts)
                    try:
                        return r.json()
                    except ValueError:
                        raise RewardError(f"reward {self.name}: {url} answered {r.status_code} with a body that is "
                                          f"not JSON: {r.text[:200]!r}") from None
                message = _server_message(r)
                if r.status_code < 500 and r.status_code not in RETRIED_4XX:
                    hint = " (set APLOT_RM_API_KEY to the server's token)" if r.status_code == 401 else ""
                    raise RewardError(f"reward {self.name}: {url} refused the request with HTTP {r.status_code}: "
                                      f"{message}{hint}")
                last = f"HTTP {r.status_code}: {message}"
            left = deadline - time.monotonic()
            if left <= 0:
                raise RewardError(f"reward {self.name}: no answer from {url} after {attempts} attempt(s) over "
                                  f"{self.wait_s:g} s (--reward_server_wait_s); last error: {last}")
            if attempts == 1:
                log.warning("reward %s: %s failed (%s); retrying with backoff for up to %g s", self.name, url,
                            last, self.wait_s)
            time.sleep(min(backoff_s, left))
            backoff_s = min(2 * backoff_s, MAX_BACKOFF_S)

    def __call__(self, prompts, response_texts, rows=None) -> torch.Tensor:
        out = self._request("POST", "/score", {"prompts": list(prompts), "responses": list(response_texts)})
        rewards = out.get("rewards") if isinstance(out, dict) else None
        if not isinstance(rewards, list) or len(rewards) != len(response_texts):
            got = f"{len(rewards)} rewards" if isinstance(rewards, list) else repr(out)[:200]
            raise RewardError(f"reward {self.name}: {self.url}/score answered {got} for {len(response_texts)} "
                              "responses")
        # null: a non-finite score (JSON has no NaN); Rewards then names the source and the prompt row
        values = [math.nan if v is None else float(v) for v in rewards]
        return torch.tensor(values, dtype=torch.float32, device=comm.device())


def _server_message(r) -> str:
    try:
        body = r.json()
        return str(body.get("error") or body.get("detail") or body) if isinstance(body, dict) else str(body)
    except ValueError:
        return r.text[:300] or r.reason_phrase
