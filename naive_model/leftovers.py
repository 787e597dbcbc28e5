"""What an interrupted checkpoint save or export leaves behind, and its removal.

No TensorFlow here: the server removes a finished job's leftovers too, since
a job that never runs again would keep them for good.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def remove_leftovers(checkpoint_dir: Path | None, export_dir: str | Path | None) -> None:
    """Remove what an interrupted save or export left (a full disk, a kill): never read again.

    TensorFlow writes a checkpoint's shards in `ckpt-N_temp*` folders and its
    list through `checkpoint.tmp*` files; an export stages in `.{name}.tmp`.
    """
    if checkpoint_dir is not None and checkpoint_dir.is_dir():
        for path in checkpoint_dir.iterdir():
            if (path.name.startswith("ckpt-") and "_temp" in path.name) or ".tmp" in path.name:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
    if export_dir is not None:
        shutil.rmtree(export_staging(Path(export_dir)), ignore_errors=True)


def export_staging(path: Path) -> Path:
    """Where an export to `path` is written before it is renamed: `.{name}.tmp` beside it."""
    return path.with_name(f".{path.name}.tmp")
