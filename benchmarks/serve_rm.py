"""Load test of the reward-model server (`aplot_rlhf.cli.serve_rm`): latency and throughput against scoring the
same requests in-process.

    python benchmarks/serve_rm.py                                # the demo reward model (runs/demo/model)
    python benchmarks/serve_rm.py --model runs/rm/model --device cuda --clients 1,4,16 --requests 16

The server runs as a subprocess on 127.0.0.1. N clients (threads, one keep-alive connection each) send M requests
each, one after another; a request is what one PPO rank sends per rollout: --per_request (prompt, response)
pairs from the demo's HH-RLHF test pairs. For each N it prints p50 / p99 latency and responses/s, once with
merging (the server's default) and once with `--max_batch_requests 1` (one request per forward: no batching).
The in-process rows score the same requests with the server's own Scorer in this process (no HTTP): one request
per forward, and max(--clients) requests per forward (tokenized beforehand: the forward's own gain from merging).
Threads: the server and the in-process scorer each get --threads torch threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
PAIRS = os.path.join(REPO, "aplot_rlhf", "demo_data", "hh-rlhf", "harmless-base-test.pairs.jsonl")


def machine() -> str:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), platform.processor())
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"CPU {cpu} ({os.cpu_count()} cores){gpu}; torch {torch.__version__}; uptime: {load}"


def requests_from_pairs(n: int, per_request: int) -> list[dict]:
    rows = [json.loads(line) for line in open(PAIRS)]
    sides = [(r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")]
    out = []
    for i in range(n):
        chunk = [sides[(i * per_request + j) % len(sides)] for j in range(per_request)]
        out.append({"prompts": [c[0] for c in chunk], "responses": [c[1] for c in chunk]})
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load(url: str, bodies: list[dict], clients: int, per_client: int) -> dict:
    """clients threads x per_client requests each -> latencies and responses/s."""
    import httpx
    latencies, lock, errors = [], threading.Lock(), []

    def client(c: int):
        with httpx.Client(timeout=600) as http:
            for k in range(per_client):
                body = bodies[(c * per_client + k) % len(bodies)]
                t0 = time.perf_counter()
                r = http.post(url + "/score", json=body)
                dt = time.perf_counter() - t0
                if r.status_code != 200 or len(r.json()["rewards"]) != len(body["responses"]):
                    errors.append(r.text[:200])
                with lock:
                    latencies.append(dt)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert not errors, errors[:3]
    n_resp = sum(len(bodies[(c * per_client + k) % len(bodies)]["responses"])
                 for c in range(clients) for k in range(per_client))
    return {"p50_ms": 1e3 * statistics.median(latencies), "p99_ms": 1e3 * percentile(latencies, 0.99),
            "responses_per_s": n_resp / wall, "requests": len(latencies)}


def start_server(args, port: int, *flags: str):
    """serve_rm in a subprocess on 127.0.0.1:port, once /health answers."""
    import httpx
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=REPO + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    env.pop("APLOT_RM_API_KEY", None)
    cmd = [sys.executable, "-m", "aplot_rlhf.cli.serve_rm", "--model", args.model, "--port", str(port),
           "--device", args.device, "--max_batch_tokens", str(args.max_batch_tokens), "--log_level", "warning",
           *flags]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not come up in 300 s")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(REPO, "runs", "demo", "model"),
                   help="a train_rm export (default: the demo's, written by `make demo`)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--per_request", type=int, default=4, help="responses per request")
    p.add_argument("--max_batch_tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the in-process row")
    p.add_argument("--out", default="", help="append the results as one JSON line to this file")
    args = p.parse_args()
    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model}: not a folder (run `make demo`, or pass a train_rm export)")
    clients = [int(c) for c in args.clients.split(",")]
    header = machine()
    print(header, flush=True)
    bodies = requests_from_pairs(max(clients) * args.requests, args.per_request)

    # in-process: the server's own Scorer, one request at a time
    import torch

    from aplot_rlhf.serve_rm import Scorer
    torch.set_num_threads(args.threads)
    scorer = Scorer(args.model, device=args.device, max_batch_tokens=args.max_batch_tokens)
    info = scorer.info()
    print(f"model {info['model']}: {info['dtype']} on {info['device']}, packing {info['packing']}, "
          f"{args.per_request} responses per request, {args.threads} torch thread(s)", flush=True)
    n = max(clients) * args.requests
    scorer.score(**bodies[0])  # warm-up
    lat = []
    t0 = time.perf_counter()
    for body in bodies[:n]:
        t = time.perf_counter()
        scorer.score(body["prompts"], body["responses"])
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    rows = [{"mode": "in-process, one request at a time", "clients": 1, "p50_ms": 1e3 * statistics.median(lat),
             "p99_ms": 1e3 * percentile(lat, 0.99), "responses_per_s": n * args.per_request / wall,
             "requests": n}]
    # in-process, max(clients) requests merged per forward (what the server's batcher does at best, no HTTP)
    k = max(clients)
    encoded = [scorer.encode(b["prompts"], b["responses"]) for b in bodies[:n]]
    t0 = time.perf_counter()
    lat = []
    for i in range(0, n, k):
        t = time.perf_counter()
        scorer.score_encoded([s for e in encoded[i:i + k] for s in e])
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    rows.append({"mode": f"in-process, {k} requests per forward (tokenized beforehand)", "clients": 1,
                 "p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * percentile(lat, 0.99),
                 "responses_per_s": n * args.per_request / wall, "requests": n, "forwards": len(lat)})
    del scorer

    import httpx

    for mode, flags in (("server, merged batches", ()), ("server, one request per forward",
                                                          ("--max_batch_requests", "1"))):
        port = free_port()
        proc = start_server(args, port, *flags)
        try:
            url = f"http://127.0.0.1:{port}"
            load(url, bodies[:8], 2, 4)  # warm-up
            for c in clients:
                before = httpx.get(url + "/info").json()
                rows.append({"mode": mode, "clients": c, **load(url, bodies, c, args.requests)})
                after = httpx.get(url + "/info").json()  # how many forwards the requests took
                rows[-1]["forwards"] = after["forwards"] - before["forwards"]
                print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(60)

    print(f"\n{header}\n| mode | clients | p50 ms | p99 ms | responses/s | requests per forward |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['clients']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['responses_per_s']:.1f} | {r['requests'] / r.get('forwards', r['requests']):.2f} |")
    best = {r["mode"]: r["responses_per_s"] for r in rows if r["clients"] == max(clients)}
    merged, single = best["server, merged batches"], best["server, one request per forward"]
    print(f"\nat {max(clients)} clients, merged batches serve {merged / single:.2f}x the responses/s of one request "
          f"per forward, {merged / rows[0]['responses_per_s']:.2f}x in-process one request at a time")
    print(f"load after the run: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"machine": header, "args": vars(args), "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
