"""What this CPU offers, read from /proc/cpuinfo, never assumed: the machines a pipeline runs on
differ (one has AVX512-BF16 or AMX, the next only AVX2), and the fastest exact choice differs."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

# Flags under which bfloat16 matrix maths runs natively; without them TensorFlow emulates it,
# which is slower than float32.
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")
SHOWN = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so nothing optional is used
        return ""


def flags() -> frozenset[str]:
    line = next((ln for ln in _cpuinfo().splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def model_name() -> str:
    line = next((ln for ln in _cpuinfo().splitlines() if ln.startswith("model name")), "")
    return line.split(":", 1)[1].strip() if ":" in line else (platform.processor() or "unknown CPU")


def has_native_bf16(cpu_flags: frozenset[str] | None = None) -> bool:
    return bool(set(NATIVE_BF16) & (flags() if cpu_flags is None else cpu_flags))


def cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe() -> str:
    shown = [f for f in SHOWN if f in flags()]
    return f"{model_name()} ({' '.join(shown) or 'no AVX2'})"
