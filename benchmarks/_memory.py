"""Peak-memory helpers shared by the benchmark scripts (Linux ``/proc``, else ``ru_maxrss``)."""

from __future__ import annotations

import resource


def maxrss_bytes() -> int:
    """Peak RSS of this process: ``VmHWM`` (the counter ``reset_peak_rss`` resets), else
    ``ru_maxrss``, which on Linux also keeps the peak seen by threads that exited before a reset."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS counter to the current RSS; return the current RSS (bytes).

    Without the reset (``/proc/self/clear_refs`` is Linux-only), ``ru_maxrss`` would still hold
    the peak of loading the inputs and hide a smaller peak of the run. If it cannot be reset, the
    old peak stays in and the reported growth errs on the high side.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
