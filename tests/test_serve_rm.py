"""The reward-model server (`python -m aplot_rlhf.cli.serve_rm`) and PPO's client (`--reward_model http://...`).

Real parts only: the server runs as a subprocess on 127.0.0.1 (uvicorn, FastAPI) with a reward model train_rm
exported, and PPO runs in this process (one rank, DeepSpeed ZeRO-2 on CPU, HF rollouts) against it. Not covered
here: a CUDA server (`--device cuda` is refused on a machine without one, tested) and TLS (https:// goes
through the same client; a proxy in front of the server terminates it).
"""
import json
import signal
import subprocess
import threading
import time

import pytest
import torch

from helpers import PYTHON, REPO, free_port, python_env
from test_ppo_correctness import ppo_config, prompt_file, trainer_factory  # noqa: F401 (fixtures)

TOKEN = "test-token-1234"


class Server:
    """serve_rm in a subprocess on 127.0.0.1, its output in a log file; start() waits for /health."""

    def __init__(self, model: str, log_path, *flags: str, port: int | None = None):
        self.model, self.log_path, self.flags = model, log_path, list(flags)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, wait_s: float = 120.0) -> "Server":
        import httpx
        cmd = [PYTHON, "-m", "aplot_rlhf.cli.serve_rm", "--model", self.model, "--port", str(self.port),
               "--device", "cpu", *self.flags]
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, env=python_env(), cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not up after {wait_s} s:\n{self.output()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # a crash: no graceful shutdown
            self.proc.wait(30)
        if self.proc is not None:
            self.log.close()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return open(self.log_path).read()[-4000:]


@pytest.fixture(scope="module")
def chat_rm_dir(tiny_llama_dir, tmp_path_factory):
    """A chat reward model as train_rm exports one: its exporter (engine.export) writes the tiny Llama with its
    one-output head and the export contract (data.export_contract: max_length 96, input format chat, reward
    mean/std 0.3/1.7). The head is untrained: these tests are about scoring, and training one costs ~50 s here
    (test_ppo_correctness's chat_rm_dir does)."""
    from aplot_rlhf.config import RMConfig
    from aplot_rlhf.data.export_contract import rm_export_fields
    from aplot_rlhf.engine.export import export_pretrained
    from aplot_rlhf.models.loader import load_model, load_tokenizer
    torch.manual_seed(0)
    model = load_model("reward", tiny_llama_dir)
    out = str(tmp_path_factory.mktemp("chat_rm") / "model")
    export_pretrained(model, load_tokenizer("reward", tiny_llama_dir), out,
                      rm_export_fields(RMConfig(model_name_or_path=tiny_llama_dir, max_length=96, loss="bt"),
                                       "chat", 0.3, 1.7))
    return out


@pytest.fixture(scope="module")
def server(chat_rm_dir, tmp_path_factory):
    """One server for the module: token required, a 64 KiB body limit."""
    s = Server(chat_rm_dir, tmp_path_factory.mktemp("server") / "server.log", "--api_key", TOKEN,
               "--max_body_mb", str(64 / 1024)).start()
    yield s
    s.kill()


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("APLOT_RM_API_KEY", TOKEN)


def post(url, body, token=TOKEN, **kw):
    import httpx
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + "/score", headers=headers, timeout=60, **kw, **(
        {"json": body} if isinstance(body, dict) else {"content": body}))


# ------------------------------------------------------------------------------ same rewards as in-process

def test_ppo_against_the_server_matches_ppo_in_process(server, token, chat_rm_dir, tiny_llama_dir,  # noqa: F811
                                                      prompt_file, tmp_path, trainer_factory):  # noqa: F811
    common = dict(critic_init="actor", prompt_format="chat", ppo_iterations=1)
    local = trainer_factory(ppo_config(tiny_llama_dir, prompt_file, tmp_path / "local",
                                       reward_model="rm=" + chat_rm_dir, **common))
    remote = trainer_factory(ppo_config(tiny_llama_dir, prompt_file, tmp_path / "remote",
                                        reward_model="rm=" + server.url, **common))
    source = remote.rewards.sources[0]
    assert not source.in_process and source.name == local.rewards.sources[0].name == "rm"
    assert (source.mean, source.std) == (local.rewards.sources[0].mean, local.rewards.sources[0].std)
    assert source.info["packing"] and source.info["input_format"] == "chat"  # packed on the server, padded here

    batch = local.prompt_batch(0)
    rm_prompts, rows = [b[1] for b in batch], [{"origin": b[2], "fields": b[3]} for b in batch]
    responses = local.generate([b[0] for b in batch])
    # an empty response (no token at all) too: both score it as one space
    responses = responses + [[]]
    rm_prompts, rows = rm_prompts + rm_prompts[:1], rows + rows[:1]
    for a, b in zip(local.score(rm_prompts, responses, rows), remote.score(rm_prompts, responses, rows)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    empty = local.rewards.sources[0](rm_prompts[:1] * 2, ["", " "])
    assert empty[0] == empty[1] and abs(source(rm_prompts[:1], [""])[0] - empty[0]) <= 1e-6

    timing = ("gen_s", "experience_s", "train_s", "sync_s", "gen_tokens_per_s")
    first_local, first_remote = local.step(), remote.step()
    assert first_local.keys() == first_remote.keys()
    for key in first_local.keys() - set(timing):
        assert first_remote[key] == pytest.approx(first_local[key], rel=1e-5, abs=1e-6), key


# ------------------------------------------------------------------------------ refusals

def test_wrong_or_missing_token_is_401_and_the_client_says_so(server, monkeypatch):
    assert post(server.url, {"prompts": ["hi"], "responses": ["yes"]}, token="wrong").status_code == 401
    r = post(server.url, {"prompts": ["hi"], "responses": ["yes"]}, token=None)
    assert r.status_code == 401 and "bearer token" in r.json()["error"]
    import httpx
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no token
    assert httpx.get(server.url + "/info").status_code == 401

    from aplot_rlhf.remote_reward import RemoteReward
    from aplot_rlhf.rewards import RewardError
    monkeypatch.setenv("APLOT_RM_API_KEY", "wrong")
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"HTTP 401.*APLOT_RM_API_KEY"):
        RemoteReward(server.url, wait_s=30)
    assert time.monotonic() - t0 < 10  # a 4xx is not retried


def test_body_over_the_limit_is_413_and_bad_input_is_4xx_with_a_message(server, token):
    big = {"prompts": ["hi"], "responses": ["x" * (65 * 1024)]}
    r = post(server.url, big)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: counted as it arrives
        yield json.dumps(big).encode()
    assert post(server.url, chunks()).status_code == 413

    r = post(server.url, b'{"prompts": ["hi"], "responses": [')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = post(server.url, {"prompts": ["a", "b"], "responses": ["x"]})
    assert r.status_code == 422 and "2 prompts for 1 responses" in r.json()["error"]
    r = post(server.url, {"prompts": ["a"], "responses": [3]})
    assert r.status_code == 422 and "responses[0]" in r.json()["error"]
    assert post(server.url, {"prompts": [], "responses": []}).json() == {"rewards": []}

    from aplot_rlhf.remote_reward import RemoteReward
    from aplot_rlhf.rewards import RewardError
    source = RemoteReward(server.url, wait_s=30)
    with pytest.raises(RewardError, match="HTTP 413"):
        source(["hi"], ["x" * (65 * 1024)])


def test_concurrent_requests_are_merged_and_answered_in_order(server):
    """Eight threads at once: each gets its own scores back (as scored alone), in its order."""
    from concurrent.futures import ThreadPoolExecutor
    bodies = [{"prompts": [f"question {i}"] * 3, "responses": [f"answer {i} {j}" for j in range(3)]}
              for i in range(8)]
    import httpx
    alone = [post(server.url, b).json()["rewards"] for b in bodies]
    info = lambda: httpx.get(server.url + "/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()  # noqa: E731
    before = info()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: post(server.url, b).json()["rewards"], bodies))
    for a, b in zip(alone, together):
        assert b == pytest.approx(a, abs=1e-6)
    after = info()
    assert after["requests"] - before["requests"] == 8
    # no request took more than one forward; whether they share one depends on arrival, so that is tested below
    assert after["forwards"] - before["forwards"] <= 8


def test_requests_queued_during_a_forward_share_the_next_one(chat_rm_dir):
    """The batcher's merge, without arrival timing: the first forward is held until the seven other requests
    are queued, so they must all go into the second forward, each getting back its own scores in its order."""
    import asyncio

    from aplot_rlhf.serve_rm import Batcher, Scorer
    scorer = Scorer(chat_rm_dir, device="cpu")
    bodies = [([f"question {i}"] * 3, [f"answer {i} {j}" for j in range(3)]) for i in range(8)]
    alone = [scorer.score(p, r) for p, r in bodies]
    batcher = Batcher(scorer, max_batch_tokens=16384)
    forward, entered, release, sizes = scorer.score_encoded, threading.Event(), threading.Event(), []

    def held_forward(seqs):
        sizes.append(len(seqs))
        entered.set()
        assert release.wait(60), "the other requests never arrived"
        return forward(seqs)

    scorer.score_encoded = held_forward

    async def main():
        runner = asyncio.create_task(batcher.run())
        while batcher.queue is None:
            await asyncio.sleep(0)
        first = asyncio.create_task(batcher.score(scorer.encode(*bodies[0])))
        while not entered.is_set():  # the first request is in its (held) forward
            await asyncio.sleep(0.01)
        rest = [asyncio.create_task(batcher.score(scorer.encode(*b))) for b in bodies[1:]]
        while batcher.queue.qsize() < 7:
            await asyncio.sleep(0.01)
        release.set()
        got = await asyncio.gather(first, *rest)
        runner.cancel()
        return got

    try:
        together = asyncio.run(main())
    finally:
        batcher.worker.shutdown(wait=False)
        batcher.tokenizer.shutdown(wait=False)
    for a, b in zip(alone, together):
        assert b == pytest.approx(a, abs=1e-6)
    assert sizes == [3, 21]  # the first request alone, then the seven queued during it in one forward
    assert (batcher.forwards, batcher.requests) == (2, 8)


def test_a_missing_server_is_one_clear_error_after_the_wait():
    from aplot_rlhf.remote_reward import RemoteReward
    from aplot_rlhf.rewards import RewardError
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RewardError) as err:
        RemoteReward(url, timeout_s=1, wait_s=2)
    assert 2 <= time.monotonic() - t0 < 8
    message = str(err.value)
    assert url in message and "attempt(s)" in message and "--reward_server_wait_s" in message
    assert "ConnectError" in message, message


def test_a_requested_cuda_device_is_never_a_cpu_fallback():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from aplot_rlhf.errors import ConfigError
    from aplot_rlhf.serve_rm import pick_device
    with pytest.raises(ConfigError, match="no CUDA device"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"


# ------------------------------------------------------------------------------ a restart during a run

@pytest.mark.slow  # a second server, killed and started again, under a 4-iteration PPO run
def test_server_restart_during_a_run_costs_no_iteration(chat_rm_dir, tiny_llama_dir, prompt_file,  # noqa: F811
                                                         tmp_path, trainer_factory, caplog):  # noqa: F811
    server = Server(chat_rm_dir, tmp_path / "server.log").start()
    cfg = ppo_config(tiny_llama_dir, prompt_file, tmp_path / "run", reward_model=server.url, critic_init="actor",
                     prompt_format="chat", ppo_iterations=4, reward_timeout_s=30, reward_server_wait_s=120)
    trainer = trainer_factory(cfg)
    events = []

    def restart():
        # after the server has answered the first /score, kill it, then start it again 2 s later
        while server.output().count("POST /score") < 1:
            time.sleep(0.05)
        server.kill()
        events.append(("killed", time.monotonic()))
        time.sleep(2.0)
        server.start()
        events.append(("up", time.monotonic()))
    worker = threading.Thread(target=restart, daemon=True)
    worker.start()
    try:
        with caplog.at_level("WARNING", logger="aplot_rlhf.remote_reward"):
            trainer.train()
        worker.join(120)
    finally:
        server.kill()
    assert [e[0] for e in events] == ["killed", "up"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    warnings = [r.getMessage() for r in caplog.records]
    assert any("retrying with backoff" in w for w in warnings), warnings  # a reward call met the dead server
    assert any("answers again" in w for w in warnings), warnings
    assert server.output().count("POST /score") >= 2  # and the restarted server answered the rest
