"""Peak resident memory of this process, for the benchmarks (Linux /proc).

can_reset = reset_peak()          # the high-water mark restarts here (False: not allowed)
base = rss_kib()
... work ...
used = peak_kib(can_reset) - base
"""

from __future__ import annotations

import re
import resource


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
