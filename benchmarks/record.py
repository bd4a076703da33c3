"""The results record's common part: where, when and how a figure was measured.

Every JSON under benchmarks/results/ opens with the same five keys, written here:

    date      ISO date of the measurement (UTC)
    commit    the checkout's short git hash (with "+dirty" when it had local changes)
    machine   processor model, its speed-relevant flags, cores, GPU (or null), torch
    command   the command line that produced the file
    settings  what the benchmark was asked to do (budget, variants, seeds, sizes...)

    from record import provenance   # in a script under benchmarks/
    result = {**provenance(settings, __file__, argv), "runs": ...}

docs/results.md and the README's headline table are generated from these files
(benchmarks/report.py, `make results`).
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

__all__ = ["PROVENANCE_KEYS", "SPEED_FLAGS", "machine", "commit", "command", "provenance"]

PROVENANCE_KEYS = ("date", "commit", "machine", "command", "settings")
"""The keys every results JSON carries at its top level."""
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
"""The CPU flags that change how fast a step runs (and what train.precision=auto picks)."""

_ROOT = Path(__file__).resolve().parent.parent


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return model, [f for f in SPEED_FLAGS if f in flags]


def machine(gpu: Optional[str] = None) -> dict[str, Any]:
    """The processor (model name and the SPEED_FLAGS it has), its core count, the GPU a
    run used (`gpu`, else the first CUDA device when torch sees one, else None), and torch."""
    model, flags = _cpuinfo()
    torch_version = None
    try:
        import torch

        torch_version = torch.__version__
        if gpu is None and torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"processor": model, "flags": flags, "cores": os.cpu_count(),
            "arch": platform.machine(), "gpu": gpu, "torch": torch_version}


def commit() -> str:
    """The checkout's short hash, "+dirty" when tracked files differ from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=_ROOT).stdout.strip()
        except OSError:
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + ("+dirty" if dirty else "")


def command(script: str, args: Optional[list] = None) -> str:
    """`python SCRIPT ARGS` as a user would type it from the repository's root; `args`:
    the arguments a script's main() was given, None for those of this process."""
    path = Path(script).resolve()
    try:
        path = path.relative_to(_ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(path), *map(str, sys.argv[1:] if args is None else args)])


def provenance(settings: dict[str, Any], script: str, args: Optional[list] = None,
               gpu: Optional[str] = None) -> dict[str, Any]:
    """The five keys of PROVENANCE_KEYS for a file `script` measures now, on this machine:
    `provenance(settings, __file__, argv)` in a benchmark's main(argv)."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            "commit": commit(), "machine": machine(gpu), "command": command(script, args),
            "settings": settings}
