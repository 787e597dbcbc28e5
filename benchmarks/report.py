"""How every benchmark hands over its results: printed, and written as JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

# The real MNIST beside the repository (../shared/data/mnist.npz), as CI and
# the development machine have it; every benchmark defaults to it.
SHARED_MNIST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist.npz"


def machine() -> dict:
    """What a result was measured on: the core count, the platform and library versions."""
    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("tensorflow", "keras", "numpy")},
    }


def publish(results: dict, path: Path | None) -> None:
    """Print `results` as JSON and, when `path` is given, write them there too."""
    text = json.dumps(results, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def side_by_side(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each timer's result, `rounds` times, the timers interleaved within each round.

    A change in the machine's speed during the run (other tenants, clock
    changes) then falls on every entry alike instead of on whichever ran at
    that moment.
    """
    results: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            results[name].append(timer())
    return results


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of the two entries' ratio within each round.

    Entries timed in the same round ran seconds apart, so their ratio there
    is steadier than the ratio of their fastest rounds, which may come from
    different minutes.
    """
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))
