"""Writing what a run leaves behind so that a crash never leaves it half-written: files and directories are
written under a temporary name, flushed to disk, then published by a rename (atomic on POSIX file systems)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_tree(path: Path) -> None:
    """Flush every file under `path`, and the directories that name them, to disk."""
    for directory, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(Path(directory))


def fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish_directory(partial: Path, final: Path) -> None:
    """Make the complete directory `partial` appear as `final`, flushed first, replacing an older `final`."""
    fsync_tree(partial)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    fsync_directory(final.parent)


def write_atomic(path: Path, text: str) -> None:
    """`path` holds either its old content or all of `text`, never a part."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    fsync_directory(path.parent)
