"""Atomic, non-clobbering file writes: nothing the user made is overwritten or lost."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from tuiwiz.errors import CannotWrite, Clobber

_WHY = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
        errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EISDIR: "it is a folder",
        errno.ENAMETOOLONG: "the name is too long"}


def why_not_writable(err: OSError) -> str:
    """A short reason for an OSError raised while writing, in the user's words."""
    return _WHY.get(err.errno or 0, err.strerror or str(err))


def write_text_atomic(path: str | os.PathLike[str], text: str, *, force: bool = False) -> Path:
    """Write `text` to `path` via a temp file + fsync + rename, so readers never see half a file.

    Refuses to replace an existing file unless `force` is true (`Clobber`), and never replaces a
    folder. Any OS failure (read-only place, a file where a folder should be, a full disk) raises
    `CannotWrite`; the temp file is removed and the original file stays as it was.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise CannotWrite(target, "it is a folder")
    if target.exists() and not force:
        raise Clobber(target)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise CannotWrite(target, why_not_writable(e)) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return target
