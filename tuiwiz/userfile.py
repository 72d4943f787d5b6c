"""Checking and opening a path the user named, with one clear message for each way it fails.

`Path.exists()` answers False for a symlink loop and for a folder we may not enter alike,
and opening a named pipe blocks until something writes to it. So a path is stat-ed first,
anything but a regular file or a folder is refused before it is opened, and every failure
becomes a `UserError` that names the path, says what is wrong, and carries the request
field (`dataset`, `model`, `tokenizer`) so a front end can point at the input to fix.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import IO, Any

from tuiwiz.errors import BadValue, NotFound, UserError

_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def expand(path: str | os.PathLike[str], *, field: str | None) -> Path:
    """`~` expanded; an unknown `~user` or a NUL character is a BadValue, not a crash."""
    text = os.fspath(path)
    if "\x00" in text:
        raise BadValue(field or "path", text, "a path cannot contain a NUL character")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "~nosuchuser/...": no home folder to expand to
        raise BadValue(field or "path", text, "names the home folder of a user that does not exist") from None


def stat_path(path: Path, *, field: str | None, what: str = "file or folder") -> os.stat_result:
    """`os.stat` of `path` (following links), each failure as a UserError naming the path."""
    try:
        return path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise NotFound(f"{path}: a symlink to {os.readlink(path)}, which does not exist.",
                           path=path, field=field) from None
        raise NotFound(f"{path}: no such {what}.", path=path, field=field) from None
    except PermissionError:
        raise UserError(f"{path}: permission denied (a folder on the way cannot be entered).", field=field) from None
    except ValueError:  # an embedded NUL byte
        raise BadValue(field or "path", str(path), "a path cannot contain a NUL character") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path}: a symlink loop (following its links never reaches a file).", field=field) from None
        if e.errno == errno.ENOTDIR:
            raise NotFound(f"{path}: no such {what} (a part of the path is a file, not a folder).",
                           path=path, field=field) from None
        raise UserError(f"{path}: cannot read it ({e.strerror or e}).", field=field) from None


def special_kind(st: os.stat_result) -> str | None:
    """'a named pipe', 'a socket', ... for what is neither a regular file nor a folder."""
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return None
    return next((name for test, name in _SPECIAL_KINDS if test(st.st_mode)), "not a regular file")


def check_regular_file(path: Path, *, field: str | None, what: str = "file") -> os.stat_result:
    """The stat of `path` when it is a regular file (through links); else a UserError.

    Pipes, sockets and devices are refused before anything opens them: reading one blocks
    or never ends.
    """
    st = stat_path(path, field=field, what=what)
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path}: a folder, not a {what}.", field=field)
    kind = special_kind(st)
    if kind is not None:
        raise UserError(f"{path}: {kind}, not a regular file; give a {what} (reading this would block).", field=field)
    return st


def open_file(path: Path, mode: str = "rb", *, field: str | None, **kwargs: Any) -> IO[Any]:
    """`path.open(mode)`, with permission and other OS errors as a UserError naming the path."""
    try:
        return path.open(mode, **kwargs)
    except PermissionError:
        raise UserError(f"{path}: permission denied; cannot read it.", field=field) from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e}).", field=field) from None


def read_text(path: Path, *, field: str | None, what: str = "file") -> str:
    """The whole UTF-8 text of a small regular file (a config), every failure a UserError."""
    check_regular_file(path, field=field, what=what)
    with open_file(path, "rb", field=field) as fh:
        try:
            raw = fh.read()
        except OSError as e:
            raise UserError(f"{path}: cannot read it ({e.strerror or e}).", field=field) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text (bad byte 0x{raw[e.start]:02x} at offset {e.start}).",
                        field=field) from None
