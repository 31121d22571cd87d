"""Check, on any machine, that the GPU install set (requirements/gpu.txt) resolves for a GPU node.

    python requirements/check_deps.py            # `make check-gpu-deps`: reads each pin's metadata
    python requirements/check_deps.py --full     # also a full dependency resolve (downloads the CUDA wheels)

For every pinned package, pip reads the metadata of exactly that release for the GPU node's platform
(CPython 3.12, manylinux x86_64) with `pip install --dry-run --no-deps --report`, so nothing is installed
and no CUDA dependency is fetched; deepspeed and flash-attn are source distributions, whose metadata pip
prepares without building them. Then every requirement one pin places on another pinned package is
checked against that pin. The metadata is saved to requirements/gpu-metadata.json, which the unit test
(tests/test_install_sets.py) re-checks on every run without the network. Exit 1 on a conflict.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = os.path.dirname(os.path.abspath(__file__))
SNAPSHOT = os.path.join(HERE, "gpu-metadata.json")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
SDISTS = {"deepspeed", "flash-attn"}  # published as source only: metadata prepared locally, never built
# the GPU node the set is for: marker values pip would see there
GPU_ENV = dict(default_environment(), python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix", implementation_name="cpython",
               platform_python_implementation="CPython")


def read_pins(path: str) -> dict[str, str]:
    """{canonical name: version} of the `name==version` lines of a requirements file and the files it -r's."""
    pins: dict[str, str] = {}
    with open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("-r"):
                pins.update(read_pins(os.path.join(os.path.dirname(path), line[2:].strip())))
                continue
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
            if not m:
                raise ValueError(f"{path}:{lineno}: expected name==version, got {line!r}")
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def _applies(req: Requirement, env: dict = GPU_ENV) -> bool:
    return req.marker is None or req.marker.evaluate(dict(env, extra=""))


def conflicts(pins: dict[str, str], metadata: dict[str, dict], env: dict = GPU_ENV) -> list[str]:
    """Every requirement a pinned package places on another pinned package that its pin does not meet."""
    out = []
    for name, meta in sorted(metadata.items()):
        for spec in meta["requires_dist"]:
            req = Requirement(spec)
            if not _applies(req, env):
                continue
            dep = canonicalize_name(req.name)
            if dep in pins and not req.specifier.contains(pins[dep], prereleases=True):
                out.append(f"{name}=={meta['version']} requires {spec}, but the set pins {dep}=={pins[dep]}")
    for name, version in pins.items():
        if name in metadata and metadata[name]["version"] != version:
            out.append(f"metadata of {name} is for {metadata[name]['version']}, the set pins {version}: rerun "
                       f"`make check-gpu-deps`")
    return out


def _pip_report(args: list[str], env: dict | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-cache-dir",
               "--quiet", "--report", report, "--target", os.path.join(tmp, "target"), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"pip failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        with open(report) as f:
            return json.load(f)["install"]


def fetch_metadata(pins: dict[str, str]) -> dict[str, dict]:
    """{name: {"version", "requires_dist"}} for every pin, read by pip for the GPU platform."""
    platform = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
    for p in PLATFORMS:
        platform += ["--platform", p]
    wheels = [f"{n}=={v}" for n, v in pins.items() if n not in SDISTS]
    sdists = [f"{n}=={v}" for n, v in pins.items() if n in SDISTS]
    items = _pip_report(["--no-deps", *platform, *wheels])
    # their setup.py files import torch (present here) and would compile CUDA code unless told not to
    env = dict(os.environ, FLASH_ATTENTION_SKIP_CUDA_BUILD="TRUE", DS_BUILD_OPS="0")
    items += _pip_report(["--no-deps", "--no-build-isolation", *sdists], env=env)
    return {canonicalize_name(i["metadata"]["name"]): {"version": i["metadata"]["version"],
                                                       "requires_dist": i["metadata"].get("requires_dist", [])}
            for i in items}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default=os.path.join(HERE, "gpu.txt"), help="requirements file to check")
    p.add_argument("--full", action="store_true", help="also resolve every transitive dependency (downloads GBs)")
    args = p.parse_args(argv)
    pins = read_pins(args.set)
    metadata = fetch_metadata(pins)
    with open(SNAPSHOT + ".tmp", "w") as f:
        json.dump(dict(sorted(metadata.items())), f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(SNAPSHOT + ".tmp", SNAPSHOT)
    print(f"{len(pins)} pins in {os.path.relpath(args.set)}; metadata of each read for CPython 3.12 manylinux x86_64")
    for name in ("torch", "triton", "transformers", "vllm", "deepspeed", "flash-attn"):
        reqs = [r.split(";")[0] for r in metadata.get(name, {}).get("requires_dist", [])
                if canonicalize_name(Requirement(r).name) in pins and _applies(Requirement(r))]
        print(f"  {name}=={pins.get(name)}: constrains pinned {', '.join(reqs) if reqs else '(none)'}")
    bad = conflicts(pins, metadata)
    if args.full:
        wheels = [f"{n}=={v}" for n, v in pins.items() if n not in SDISTS]
        platform = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
        for pl in PLATFORMS:
            platform += ["--platform", pl]
        items = _pip_report([*platform, *wheels])
        print(f"full resolve: {len(items)} distributions, e.g. "
              + ", ".join(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items[:12]))
    for line in bad:
        print("CONFLICT:", line)
    print("OK: the GPU set is consistent" if not bad else f"FAIL: {len(bad)} conflict(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
