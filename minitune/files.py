"""Files that are either whole or absent: fsync a written tree, replace a file in one step, and
delete a folder so that no moment of the deletion leaves a complete-looking one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["fsync_dir", "fsync_tree", "remove_folder", "write_atomic"]


def fsync_tree(path: Path) -> None:
    """Flush every file under `path`, then every folder (so the new names are durable too)."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        fsync_dir(d)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_folder(path: Path) -> None:
    """Delete a folder (a checkpoint) so that no moment of the deletion leaves a complete-looking one."""
    trash = path.parent / f".trash-{path.name}"
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` in one step: a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
