"""Measurements taken during a run: memory, time, environment."""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from typing import Any

import torch

__all__ = ["current_rss", "environment", "median", "peak_rss", "ProgressBar", "release_free_memory", "reset_peak_rss"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = "/proc/self/statm"  # Linux only
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def current_rss() -> int | None:
    """Resident set size of this process now, in bytes: Linux's /proc, else psutil's; None if neither is
    there. Never the process's lifetime peak (``ru_maxrss``): every run of a compare after the first
    would inherit the largest earlier run's peak."""
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int | None:
    """The resident set's high-water mark since :func:`reset_peak_rss` (Linux's ``VmHWM``), in bytes;
    None where there is none to read."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart :func:`peak_rss` from the resident set now (Linux: 5 written to ``/proc/self/clear_refs``);
    False where it cannot be, and the caller must sample :func:`current_rss` instead.

    The high-water mark sees every page a run touches, inside an optimizer step too: samples taken
    between steps missed a step's temporaries (above glibc's mmap threshold they are handed back to
    the system as they are freed; 126 MiB of a 12.6M-parameter torch-path step, found by an audit).
    """
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return peak_rss() is not None


def release_free_memory() -> None:
    """Hand memory that is free but still held by the C allocator back to the system (glibc's
    ``malloc_trim``; elsewhere nothing), so that a run's resident set starts from what is in use and
    not from what earlier runs of the process left behind."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and machine, recorded with every run."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "microadam": _version("microadam"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for pkg in ("transformers", "bitsandbytes", "torchao", "galore-torch", "adam-mini", "came-pytorch", "lion-pytorch"):
        v = _version(pkg)
        if v:
            env[pkg] = v
    return env


class ProgressBar:
    """A one-line progress bar with ETA on a terminal; sparse lines when the output is a file."""

    def __init__(self, total: int, label: str, stream: Any = None) -> None:
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_pct = -1

    def update(self, done: int, extra: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        frac = done / self.total if self.total else 1.0
        eta_s = "--:--" if eta != eta else f"{int(eta) // 60:d}:{int(eta) % 60:02d}"
        if self.tty:
            bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
            self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} ETA {eta_s} {extra}   ")
            if done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            pct = int(100 * frac) // 25 * 25
            if pct != self.last_pct:
                self.last_pct = pct
                self.stream.write(f"{self.label}: {done}/{self.total} ({pct}%) ETA {eta_s} {extra}\n")
                self.stream.flush()
