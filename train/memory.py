"""Peak memory of this process: resident memory (Linux /proc) and the CUDA allocator's peak.

    can_reset = reset_peak()          # the high-water mark restarts here (False: not allowed)
    base = rss_kib()
    ... work ...
    used = peak_kib(can_reset) - base

    meter = PeakMemory(device)        # the trainer: peak since the last read, per log window
    meter.read_bytes()                # CUDA max_memory_allocated, else the peak RSS (VmHWM)

Used by the trainer's step metrics and the benchmarks.
"""

from __future__ import annotations

import re
import resource

import torch

__all__ = ["status_kib", "rss_kib", "reset_peak", "peak_kib", "PeakMemory"]


def status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def rss_kib() -> int:
    return status_kib("VmRSS")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_kib(can_reset: bool) -> int:
    """The peak RSS since `reset_peak` (the lifetime peak, ru_maxrss, where it failed)."""
    if can_reset:
        return status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


class PeakMemory:
    """Peak memory since the previous `read_bytes` (or construction): on a CUDA device the
    allocator's max_memory_allocated (tensors only), on CPU the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs; where that is not allowed, the lifetime peak)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._reset()

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.can_reset = reset_peak()

    def read_bytes(self) -> int:
        if self.cuda:
            value = int(torch.cuda.max_memory_allocated(self.device))
        else:
            value = 1024 * peak_kib(self.can_reset)
        self._reset()
        return value
