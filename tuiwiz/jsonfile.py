"""Reading a JSON object from a user's file with one actionable error (file, line, reason)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuiwiz.errors import UserError
from tuiwiz.userfile import read_text


def read_json_object(path: Path, what: str = "a JSON object", *, field: str | None = None) -> dict[str, Any]:
    """The object in `path`; a missing, unreadable, non-UTF-8 or malformed file is a UserError.

    `field` is the request field the file came from (`model`, `tokenizer`), for front ends.
    """
    text = read_text(path, field=field, what="JSON file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}).", field=field) from None
    except RecursionError:
        raise UserError(f"{path}: not a usable JSON file (nested too deeply).", field=field) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected {what}, got {json_type(data)}.", field=field)
    return data


def json_type(value: Any) -> str:
    """A JSON value's kind as a message says it: 'an array', 'a string', 'null'."""
    names = {list: "an array", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
