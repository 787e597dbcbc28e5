"""How every benchmark hands over its results: printed, and written as JSON."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path


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
