"""Shared helpers for the benchmark scripts: timing and the report file."""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from pathlib import Path

from pipeline import cpu as cpu_info

PROJECT = Path(__file__).resolve().parents[1]
REPORT = PROJECT / "reports" / "benchmarks.md"


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def cpu() -> str:
    """CPU model and the flags that change the figures (AVX-512, native bf16), read from
    /proc/cpuinfo: never assumed."""
    return cpu_info.describe()


def machine() -> str:
    return f"{platform.machine()}, {cpu()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def append_report(title: str, rows: list[tuple[str, str]], notes: list[str]) -> None:
    """Append one benchmark run (a markdown table plus notes) to reports/benchmarks.md."""
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"\n## {title} ({stamp}, {machine()})\n", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += [""] + [f"- {n}" for n in notes] + [""]
    if not REPORT.exists():
        REPORT.write_text("# Benchmarks\n\nAppended by the scripts in `benchmarks/`; "
                          "ratios are measured within one run.\n")
    with REPORT.open("a") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
