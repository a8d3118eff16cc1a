"""The machine: which device and dtype to run on, how to time work on it, and how much memory it used.

Shared by the model, the samplers (their clock), the command line and the benchmark, so that each rule lives here once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """A device by name: auto (cuda if available, else cpu), cpu, cuda or cuda:N; ValueError if not usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cpu" and device.index not in (None, 0):  # torch sees all cores as one CPU device
        raise ValueError(f"device {name!r}: torch has one CPU device (all cores): use cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available: use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_dtype(dtype) -> torch.dtype:
    """A torch dtype the models run in, given as one (torch.float32) or by name ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)} (or torch's dtypes)")
    return dtype


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype by name; "auto" is bfloat16 where the hardware runs it natively (CUDA with bf16, CPUs with
    AVX-512 BF16 or AMX), float32 elsewhere (without those, bf16 matrix products are emulated and slower)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if native_bfloat16() else torch.float32


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX); without, bf16 products are emulated."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32."""
    return str(dtype).removeprefix("torch.")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: assume no native bf16
        return set()


def hardware_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        name = platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA runs kernels asynchronously); nothing to do on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock(Protocol):
    def mark(self) -> object:
        """A point in time, taken without waiting for the device."""

    def ms(self, start: object, end: object) -> float:
        """Milliseconds between two marks; call it after the device has caught up with both."""


class DeviceClock:
    """Marks points of a round without a host sync of its own: on CUDA a mark is a recorded event (read after
    the round's one sync), elsewhere a `time.perf_counter()` reading."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> torch.cuda.Event | float:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else 1e3 * (end - start)


def peak_memory(device: torch.device) -> str:
    """The most memory this process has held: allocated on a CUDA device, else resident."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on {device}"
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{kib / 2**20:.2f} GiB resident (RSS)"
