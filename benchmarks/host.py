"""Host facts every benchmark records: CPU model, usable cores, a file-name tag."""

from __future__ import annotations

import os
import platform
import re


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def slug(text: str) -> str:
    """``AMD EPYC 2c`` -> ``amd-epyc-2c`` (for result file names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_tag() -> str:
    """``cpu-<model>-<cores>c``, the device part of a CPU result file name."""
    return f"cpu-{slug(f'{cpu_name()}-{usable_cores()}c')}"
