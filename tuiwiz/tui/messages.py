"""Typed messages that workers post back to the UI thread (`post_message` is thread-safe).

Workers never touch widgets; they send one of these and the app updates the shared state.
The heavy types are imported for type checking only: building a message costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:
    from tuiwiz.data import CountingTokenizer, LengthProfile
    from tuiwiz.hardware import GpuInfo, HardwareInventory
    from tuiwiz.models import ModelSpec
    from tuiwiz.preset import Preset
    from tuiwiz.runs.launcher import LaunchedRun
    from tuiwiz.tui.state import Preview


class HardwareDetected(Message):
    """The first inventory: NVML GPUs, or the catalog fallback with its one-line reason."""

    def __init__(self, inventory: HardwareInventory) -> None:
        super().__init__()
        self.inventory = inventory


class GpusPolled(Message):
    """A fresh NVML reading (memory, utilisation, temperature)."""

    def __init__(self, gpus: list[GpuInfo]) -> None:
        super().__init__()
        self.gpus = gpus


class ModelResolved(Message):
    """The model's shape, read from `ref` (a local folder when `is_path`, else a hub id)."""

    def __init__(self, ref: str, spec: ModelSpec, is_path: bool) -> None:
        super().__init__()
        self.ref = ref
        self.spec = spec
        self.is_path = is_path


class ModelChoices(Message):
    """Hub ids found in the local HF cache (scanned in a worker)."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__()
        self.ids = ids


class TokenizerChosen(Message):
    """The tokenizer the profile is about to count with (before the slow part starts)."""

    def __init__(self, tokenizer: CountingTokenizer, generation: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.generation = generation


class ProfileProgress(Message):
    def __init__(self, done: int, total: int | None, generation: int) -> None:
        super().__init__()
        self.done = done
        self.total = total
        self.generation = generation


class ProfileDone(Message):
    """A finished profile; `generation` says which request it was for (stale ones are dropped)."""

    def __init__(self, profile: LengthProfile, tokenizer: CountingTokenizer, generation: int) -> None:
        super().__init__()
        self.profile = profile
        self.tokenizer = tokenizer
        self.generation = generation


class PreviewReady(Message):
    """The masked-token preview of one sample, for profile `generation`."""

    def __init__(self, preview: Preview, generation: int) -> None:
        super().__init__()
        self.preview = preview
        self.generation = generation


class RunLaunched(Message):
    def __init__(self, launched: LaunchedRun) -> None:
        super().__init__()
        self.launched = launched


class LaunchNeedsDownload(Message):
    """Pre-flight found the model (or its tokenizer) missing offline: ask before letting the worker fetch it."""

    def __init__(self, preset: Preset, why: str) -> None:
        super().__init__()
        self.preset = preset
        self.why = why
