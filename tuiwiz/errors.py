"""User-facing errors as types: the core says what went wrong, each front end says it its own way.

Anything the user can fix (a bad value, a missing file, a malformed preset) is a `UserError`.
The core never names a CLI flag or a TUI key: a `BadValue` carries the knob or request field
(`micro_batch_size`, `dataset`), a `Clobber` the path it refused to replace. The CLI renders a
field as the flag the user typed (`--micro-batch`) and a clobber as "pass --force"; the TUI
names the field by its label and offers an Overwrite button. Nothing matches on message text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

#: Longest message any error carries: a YAML alias bomb or a huge value must not print megabytes.
MAX_MESSAGE = 2000


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` cut to `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return text[: limit - 40].rstrip() + f"… ({len(text) - limit + 40} more characters)"


def shown(value: object, limit: int = 80) -> str:
    """A value as a message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class UserError(Exception):
    """An error caused by input the user can correct. `str(err)` is a whole message in neutral words.

    `field` names what was wrong (a knob such as `lora_rank`, or a request field: `model`,
    `tokenizer`, `dataset`, `gpu`, `gpus`, `percentile`...), so a front end can name it its own way.
    """

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(bounded(message))
        self.field = field

    def render(self, name_of: Callable[[str], str] | None = None) -> str:
        """The message with the field named the front end's way (`name_of(field)`)."""
        return str(self)


class BadValue(UserError):
    """A value that is out of range or nonsense: `field` is the knob or request field, `why` the rule."""

    def __init__(self, field: str, value: object, why: str) -> None:
        self.value, self.why = value, why
        super().__init__(f"{field}: {why} (got {shown(value)}).", field=field)

    def render(self, name_of: Callable[[str], str] | None = None) -> str:
        name = name_of(self.field) if name_of is not None and self.field else self.field
        return bounded(f"{name}: {self.why} (got {shown(self.value)}).")


class NotFound(UserError):
    """Something named by the user does not exist (a file, a model, a run)."""

    def __init__(self, message: str, *, path: str | Path | None = None, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.path = Path(path) if path is not None else None


class Clobber(UserError):
    """Writing would replace a file the user already has; the caller decides whether to force it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path} already exists.")


class CannotWrite(UserError):
    """A destination that cannot take the file: read-only, a directory, under a file, or full."""

    def __init__(self, path: str | Path, why: str) -> None:
        self.path, self.why = Path(path), why
        super().__init__(f"{self.path}: cannot write it ({why}); nothing was changed.")


class CancelledError(Exception):
    """Long work (profiling, scanning) was cancelled by the user."""
