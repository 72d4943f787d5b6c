"""Turn an exception into the error event's kind, one-line message and suggestion."""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tuiwiz.errors import UserError
from tuiwiz.train.errors import DataError, SetupError

_CUDA_MARKERS = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "NCCL", "device-side assert", "CUDA driver")
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: How writers that drop the errno say it (safetensors: "I/O error: No space left on device (os error 28)").
_DISK_MARKERS = ("No space left on device", "Disk quota exceeded")
#: With less free than this on the run's disk, a failure nobody explained is the full disk:
#: torch.save reports one only as "[enforce fail at inline_container.cc] unexpected pos".
LOW_DISK_BYTES = 1024 * 1024
_FLASH_MARKERS = ("flash_attn", "FlashAttention")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it was raised from or while handling (CannotWrite hides its OSError)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


def is_disk_full(exc: BaseException) -> bool:
    """A write failed because the disk (or the user's quota) is full, somewhere in the chain."""
    return any(isinstance(e, OSError) and e.errno in _DISK_ERRNOS or any(m in str(e) for m in _DISK_MARKERS)
               for e in _chain(exc))


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


_UNITS = {"B": 1, "bytes": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
_SIZE = r"([0-9]+(?:\.[0-9]+)?) (bytes|B|KiB|MiB|GiB|TiB)"
_TRIED = re.compile(r"Tried to allocate " + _SIZE)
_FREE = re.compile(r"total capacity of " + _SIZE + r" of which " + _SIZE + r" is free")


@dataclass(frozen=True)
class OomSizes:
    """What torch's CUDA OOM message says: the allocation that failed, the card, its free memory."""

    tried: int
    total: int
    free: int

    @property
    def overshoot(self) -> int:
        """How far past the free memory the failed allocation reached (0: fragmentation, not size)."""
        return max(0, self.tried - self.free)


def oom_sizes(exc: BaseException) -> OomSizes | None:
    """The sizes in a CUDA caching allocator OOM message ("Tried to allocate 2.00 GiB. GPU 0 has a
    total capacity of 23.55 GiB of which 1.20 GiB is free. ..."); None when it does not say them."""
    text = " ".join(str(exc).split())
    tried, free = _TRIED.search(text), _FREE.search(text)
    if tried is None or free is None:
        return None

    def size(num: str, unit: str) -> int:
        return round(float(num) * _UNITS[unit])

    return OomSizes(size(*tried.groups()), size(*free.groups()[:2]), size(*free.groups()[2:]))


def _is_setup(exc: BaseException) -> bool:
    return any(isinstance(e, (SetupError, ImportError)) for e in _chain(exc))


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    msg = f"{type(exc).__name__}: {text}"
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def _disk(exc: BaseException, run_dir: Path | None) -> tuple[str, str, str]:
    where = f"the disk holding the run folder {run_dir}" if run_dir else "the run folder's disk"
    return ("disk", f"{where} is full: {one_line(exc, 200)}",
            "Free space on that disk (old runs and their checkpoints are the usual culprits); resuming the run "
            "continues from its last complete checkpoint.")


def classify(exc: BaseException, phase: str, *, run_dir: Path | None = None,
             disk_free: int | None = None) -> tuple[str, str, str]:
    """(kind, message, suggestion); `phase` is where the worker was ('data', 'model', 'train', ...).

    `disk_free` is the free space on the run's disk when it failed (before the worker gave back
    its reserve); nearly none left turns an otherwise unexplained failure into kind 'disk'.
    """
    msg = one_line(exc)
    if is_disk_full(exc):
        return _disk(exc, run_dir)
    if _is_oom(exc):
        return ("oom", msg, "Out of GPU memory: relaunch with this event's smaller plan, "
                "or lower micro_batch_size / cutoff_len, or turn on grad_checkpointing.")
    if _is_setup(exc):
        if any(m in msg for m in _FLASH_MARKERS):
            return ("setup", msg, "FlashAttention 2 cannot run here: install flash-attn built for this torch and "
                    "CUDA on an Ampere or newer GPU, or set training.attn to sdpa, then launch again.")
        return ("setup", msg, "A package the run needs is missing or broken in the worker's Python "
                "(see train.log); install it there, then launch again.")
    if isinstance(exc, DataError) or (phase == "data" and isinstance(exc, (UserError, ValueError, KeyError, TypeError))):
        return ("data", msg, "Fix the dataset row named above (or the preset's dataset.layout / columns), "
                "then launch again; planning from the preset re-checks the data.")
    if any(m in str(exc) for m in _CUDA_MARKERS) or type(exc).__name__ in ("AcceleratorError", "CudaError"):
        return ("cuda", msg, "A CUDA/driver error: check `nvidia-smi`, the driver and torch CUDA versions; "
                "rerun with CUDA_LAUNCH_BLOCKING=1 for the failing op.")
    if disk_free is not None and disk_free < LOW_DISK_BYTES:
        return _disk(exc, run_dir)
    if isinstance(exc, UserError):
        return ("other", str(exc), "Fix the preset or files named above and launch again.")
    return ("other", msg, "See train.log in the run directory for the full traceback.")
