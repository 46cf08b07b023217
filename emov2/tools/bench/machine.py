"""What the benchmark ran on: CPU model, cores, threads, bf16 support, library versions."""
from __future__ import annotations

import glob
import os
import platform
import re
import subprocess

import torch


def cpu_flags() -> set[str]:
    """The CPU flags from ``/proc/cpuinfo`` (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as fh:
            match = re.search(r"^flags\s*:\s*(.*)$", fh.read(), re.M)
        return set(match.group(1).split()) if match else set()
    except OSError:
        return set()


def cpu_model() -> str:
    """The CPU model name as ``lscpu`` prints it, else ``platform.processor()``."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache cpu0 sees (usually the shared L3), from sysfs; None if unknown."""
    sizes = []
    for folder in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(folder, "size")) as fh:
                text = fh.read().strip().upper()
        except OSError:
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            sizes.append(int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)])
    return max(sizes) if sizes else None


def bf16_support() -> dict:
    """Whether the CPU has native bf16 arithmetic (``avx512_bf16``) or AMX tiles (``amx_bf16``)."""
    flags = cpu_flags()
    native = {"avx512_bf16", "amx_bf16"} & flags
    return {
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "native": bool(native),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): on a shared machine the
    absolute times of a benchmark mean little without them."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: str = "cpu") -> dict:
    """A JSON-able description of the machine and software."""
    info = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "onnxruntime": _version("onnxruntime"),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "bf16": bf16_support(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "device": device,
        "loadavg_1_5_15": load_average(),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
