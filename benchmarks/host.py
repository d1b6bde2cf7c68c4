"""Host facts every benchmark records (CPU model, usable cores, a file-name tag), and a runner
that measures a child process tree's peak memory."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import threading
import time

import psutil


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


def run_with_peak_memory(
    cmd: list[str], env: dict[str, str], measure: str = "rss", interval_s: float = 0.02
) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run ``cmd`` to completion, polling the memory of its process tree.

    Args:
        cmd: the command.
        env: its environment.
        measure: ``rss`` (resident set, summed over the process and its children) or ``pss``
            (proportional set size: pages that forked workers share count once).
        interval_s: polling period.

    Returns:
        ``(result, wall seconds, peak bytes)``; the output is drained while it runs.
    """
    if measure not in ("rss", "pss"):
        raise ValueError(f"measure must be 'rss' or 'pss', got {measure!r}")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def usage(p: psutil.Process) -> int:
        return p.memory_full_info().pss if measure == "pss" else p.memory_info().rss

    def poll():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                peak = max(peak, sum(usage(p) for p in [root, *root.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(interval_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    out, err = proc.communicate()
    stop.set()
    thread.join()
    wall = time.perf_counter() - start
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), wall, peak


def device_info(device: str) -> dict:
    """A description of the machine and software the numbers were measured on."""
    import platform as py_platform

    import torch

    try:
        import megatron.core

        core_version = getattr(megatron.core, "__version__", "unknown")
    except ImportError:  # the serving environment (vLLM) has no megatron-core
        core_version = None
    info = {
        "device": device,
        "cpu": cpu_name(),
        "cpu_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "megatron_core": core_version,
        "python": py_platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def device_tag(info: dict) -> str:
    """Short file-name tag, e.g. ``cpu-amd-epyc-2c`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    name = info["gpu"] if info["device"] == "cuda" else f"{info['cpu']}-{info['cpu_cores']}c"
    return f"{info['device']}-{slug(name)}"
