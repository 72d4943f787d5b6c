"""Failures the worker names a kind for itself (the rest are classified from the exception)."""

from __future__ import annotations


class DataError(ValueError):
    """A training example or batch is malformed (error kind 'data')."""


class SetupError(RuntimeError):
    """The machine cannot run this plan as set up: a package is missing or the card too old (kind 'setup')."""
