"""Shared timing, table and JSON helpers for the benchmarks in this folder.

Every benchmark measures its contenders side by side in one process run and reports ratios
(see docs/benchmarks.md): absolute times on a shared machine move from run to run, ratios hold.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Where write_json puts results instead of RESULTS_DIR when set (.ci/gpu collects a run's JSON
# next to its logs this way).
RESULTS_DIR_ENV = "RECIS_BENCH_RESULTS_DIR"


@dataclasses.dataclass(frozen=True)
class Stats:
    """Wall-clock times of repeated calls, in seconds."""

    median_s: float
    min_s: float
    max_s: float
    times_s: tuple[float, ...]

    def rate(self, units: float) -> float:
        """Units per second at the median time (e.g. rows/s for ``units=rows``)."""
        return units / self.median_s if self.median_s > 0 else float("inf")


def measure(fn: Callable[[], Any], *, reps: int = 7, warmup: int = 2, settle: int = 0) -> Stats:
    """Time ``fn()`` ``reps`` times after ``warmup`` untimed calls.

    The garbage collector runs before each call (not inside the timing) so one contender's
    garbage is not billed to the next. ``settle`` untimed calls then run between the collection
    and the timed call, for calls of a few milliseconds: on the 2-core benchmark VM, code and
    data left untouched for tens of milliseconds (by a full collection, or by the contender
    timed before) cost 1-2 ms to touch again (a 4096-element ``torch.add`` takes about 1 ms
    right after a 60 ms pause, 3 us otherwise), which would swamp such a call.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        gc.collect()
        for _ in range(settle):
            fn()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Stats(statistics.median(times), min(times), max(times), tuple(times))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    Read from Linux's ``VmHWM``, the peak of this program's own memory: ``ru_maxrss`` is
    carried over ``exec`` from the forking process (a benchmark's main process that made the
    data), so a contender run in a child would report its parent's peak when that is larger.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Print (and return) a Markdown table, numbers formatted for reading."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-2):
                return f"{v:.3g}"
            return f"{v:,.2f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)
    ]
    lines = [
        f"### {title}",
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "| " + " | ".join("-" * w for w in widths) + " |",
    ]
    lines += [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def results_dir() -> Path:
    """``$RECIS_BENCH_RESULTS_DIR`` when set, else ``benchmarks/results``."""
    override = os.environ.get(RESULTS_DIR_ENV)
    return Path(override) if override else RESULTS_DIR


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus machine info and a timestamp) to ``<results_dir()>/<name>.json``."""
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    doc = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info()}
    doc.update(payload)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path
