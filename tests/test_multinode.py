"""Two "nodes" for real: two network namespaces joined by a veth pair, one torchrun in each, training the
reward model under ZeRO-3 over gloo across the link; the losses must match a single-node 2-process run."""
import os
import shutil
import subprocess

import pytest

from conftest import PYTHON, REPO, python_env
from test_rm_train import read_metrics, rm_args, torchrun

STEPS = 4


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root, so there this test runs)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (`make test` installs it as root)")
    tag = str(os.getpid() % 100000)
    a, b, va, vb = f"aplotA{tag}", f"aplotB{tag}", f"va{tag}", f"vb{tag}"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        sh("ip", "link", "set", va, "netns", a)
        sh("ip", "link", "set", vb, "netns", b)
        for ns, dev, addr in ((a, va, "10.77.0.1/24"), (b, vb, "10.77.0.2/24")):
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", addr, "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"could not build network namespaces here: {exc.stderr.strip()}")
    try:
        yield [(a, va, "10.77.0.1"), (b, vb, "10.77.0.2")]
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_two_namespace_nodes_match_single_node(two_hosts, tiny_llama_dir, tmp_path):
    def flags(out):
        return rm_args(tiny_llama_dir, out, max_steps=STEPS, save_steps=0) + ["--no-export"]

    single = tmp_path / "single"
    proc = subprocess.run(torchrun(flags(single), 29541), env=python_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    multi = tmp_path / "multi"
    master = two_hosts[0][2]
    procs = []
    for node_rank, (ns, dev, _) in enumerate(two_hosts):
        env = python_env() | {"GLOO_SOCKET_IFNAME": dev}
        cmd = ["ip", "netns", "exec", ns, PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--master_addr", master, "--master_port", "29542",
               "-m", "aplot_rlhf.cli.train_rm", *flags(multi)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    a, b = read_metrics(single), read_metrics(multi)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step]["train/loss"] - b[step]["train/loss"]) < 1e-5, (step, a[step], b[step])
