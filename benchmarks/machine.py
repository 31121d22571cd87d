"""The machine line every benchmark prints in its header.

Numbers from different CPUs (AVX2 only, AVX-512, AVX-512 bf16, AMX) or taken under another job's load are not
comparable: each benchmark says which CPU, which of the ISA extensions that set its fp32/bf16 matmul speed,
which torch, and the load average (as `uptime` prints it) when it started.

  from machine import print_machine_header   # a script in benchmarks/ (its folder is on sys.path)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def machine_header() -> str:
    """One line: CPU model and count, the ISA flags that matter (+ has, - lacks), the precision a --precision
    bf16 run gets here, torch's version, the GPU if any, and the 1/5/15-minute load average."""
    import torch

    from aplot_rlhf.engine.deepspeed import BF16_CPU_FLAGS, ISA_FLAGS, cpu_info
    model, flags = cpu_info()
    isa = " ".join(("+" if f in flags else "-") + f for f in ISA_FLAGS)
    bf16 = "bf16 units" if any(f in flags for f in BF16_CPU_FLAGS) else "no bf16 units: CPU runs train in fp32"
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {model}, {os.cpu_count()} CPU(s); ISA {isa} ({bf16}); torch {torch.__version__}{gpu}; "
            f"load average {load} (uptime)")


def print_machine_header() -> None:
    print(machine_header(), flush=True)


if __name__ == "__main__":
    print_machine_header()
