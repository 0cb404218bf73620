"""What every benchmark records about its run (date, machine, command) for docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, CPU count and GPU (if torch is loaded and sees one), in a few words."""
    gpu = "no GPU"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return f"{_cpu_model()}, {os.cpu_count()} CPUs, {gpu}"


def run_info() -> dict[str, str]:
    """``date`` (UTC, to the minute), ``machine`` and ``command`` (as typed from the repository)."""
    script = os.path.relpath(
        os.path.abspath(sys.argv[0]), os.path.dirname(os.path.dirname(__file__))
    )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": shlex.join(["python", script, *sys.argv[1:]]),
    }
