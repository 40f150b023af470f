"""File writing shared by the testbed's savers (checkpoints, classifier weights)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["write_atomically"]


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Writes a file through ``write(f)`` so that a reader never sees half of it.

    The bytes go to a temporary file beside ``path``, are flushed to disk, and the file is
    renamed over ``path``: a crash leaves either the old file or the new one. Writing beside the
    target (not in a temporary folder) keeps the rename on one file system and gives the file
    ordinary permissions (the umask applies). If ``write`` raises, the temporary file is removed
    and ``path`` is left as it was.

    Args:
      path: destination file.
      write: called once with the open binary file.
    """
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
