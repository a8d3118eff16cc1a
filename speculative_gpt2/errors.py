"""The errors the package raises besides plain ValueErrors, and how an allocator's refusal is recognised."""

from __future__ import annotations

import re

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match its config."""


class OutOfMemory(CheckpointError):
    """Memory ran out (loading a checkpoint, packing weights): the files are not to blame and must not be deleted."""


def is_out_of_memory(error: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError, or an allocator's refusal reported as another error."""
    text = str(error).lower()
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or any(
        s in text for s in ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory",
                            "os error 12"))


def asked_size(error: BaseException) -> str:
    """What an allocator said it was asked for, as " (asked for 4.6e+18 bytes)", or "" when it does not say."""
    found = re.search(r"allocate (\d+) bytes|[Tt]ried to allocate ([\d.]+ [KMGT]i?B)", str(error))
    if found is None:
        return ""
    return f" (asked for {int(found.group(1)):.3g} bytes)" if found.group(1) else f" (asked for {found.group(2)})"
