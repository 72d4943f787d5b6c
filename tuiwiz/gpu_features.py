"""What a GPU can run, judged from its compute capability alone (no torch import).

The planner (warn when a card is too old), the launch pre-flight (refuse when a package is
missing) and the training worker (choose the compute dtype) all decide from these rules, so
they never disagree about a card.
"""

from __future__ import annotations

import importlib.util

Capability = tuple[int, int]

#: Ampere (sm_80) is the first generation with bf16 tensor cores and the oldest FlashAttention 2 supports.
AMPERE: Capability = (8, 0)


def parse_capability(text: str | None) -> Capability | None:
    """'8.6' (as NVML and `GpuInfo.compute_capability` give it) -> (8, 6); None when unknown or malformed."""
    if not text:
        return None
    major, _, minor = text.partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return None


def native_bf16(capability: Capability | None) -> bool:
    """True when the card computes in bf16 in hardware (sm_80+).

    `torch.cuda.is_bf16_supported()` also says True on a T4 or V100, where bf16 is emulated
    (slowly, and without bf16 tensor cores), so the capability is the test, not that call.
    """
    return capability is not None and tuple(capability) >= AMPERE


def flash_attn_installed() -> bool:
    """Whether the `flash_attn` package can be imported (without importing it: it loads CUDA)."""
    return importlib.util.find_spec("flash_attn") is not None


def flash_attn_problem(capability: Capability | None, installed: bool) -> str | None:
    """Why FlashAttention 2 cannot run here, or None when nothing is known against it.

    `capability` None means "card unknown" (no warning on that ground); `installed` comes from
    `flash_attn_installed()` on the machine that will train.
    """
    if capability is not None and tuple(capability) < AMPERE:
        major, minor = capability
        return (f"attn: FlashAttention 2 needs an Ampere or newer GPU (compute capability 8.0+); "
                f"this card is {major}.{minor}. Use sdpa attention instead.")
    if not installed:
        return ("attn: FlashAttention 2 is not installed (the flash_attn package is missing); "
                "install flash-attn built for this torch and CUDA, or use sdpa attention.")
    return None
