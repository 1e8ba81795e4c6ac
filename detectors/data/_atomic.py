"""Atomic file writes for generated datasets and converted annotation files.

A run can be interrupted at any moment (a killed Ray worker, Ctrl-C). A half-written JSON would
then be picked up by the next run as if it were complete, so every file is written to a temporary
name in the destination directory and moved into place with ``os.replace``, which is atomic on
POSIX when source and target share a filesystem.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    ``durable`` adds an fsync: worth it for the few JSON files, too slow for thousands of images.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as JSON (compact, key order kept, so output is reproducible)."""
    atomic_write_bytes(path, json.dumps(obj, separators=(",", ":")).encode("utf-8"), durable=True)


def written_with(manifest: Path, params: dict[str, Any]) -> bool:
    """Whether the folder of ``manifest`` was written completely with ``params`` (the manifest is written last).
    If not, the stale manifest goes first, so an interrupted rewrite is never taken for a complete one."""
    try:
        if json.loads(manifest.read_text()) == params:
            return True
    except (OSError, ValueError):
        pass
    manifest.unlink(missing_ok=True)
    return False


def atomic_save_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    """Atomically write an HxWx3 uint8 array as PNG (PIL's PNG writer is byte-deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
