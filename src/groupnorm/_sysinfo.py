"""What CPU this is, read from /proc/cpuinfo (empty strings where that file does not exist)."""

from __future__ import annotations

import contextlib


def cpuinfo_line(*prefixes: str) -> str:
    """The value of the first /proc/cpuinfo line that starts with one of ``prefixes``, or ''."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(prefixes):
                return line.split(":", 1)[1].strip() if ":" in line else line.strip()
    return ""


def cpu_model() -> str:
    """The CPU's model name (e.g. 'AMD EPYC'), or ''."""
    return cpuinfo_line("model name")


def cpu_flags() -> str:
    """The CPU's feature flags (x86 'flags', Arm 'Features'), or ''."""
    return cpuinfo_line("flags", "Features")
