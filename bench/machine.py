"""What a benchmark ran on, said the same way in every results file: the CPU by name (not just `x86_64`), cores,
threads, the GPU, and the versions of the packages whose speed is measured."""

from __future__ import annotations

import importlib
import os
import platform

__all__ = ["describe", "summary"]


def describe(*packages: str) -> dict:
    """The machine, and the version of each module in `packages` (keyed by module name)."""
    import torch

    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    machine = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kernel": platform.release(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
    }
    for name in packages:
        machine[name] = importlib.import_module(name).__version__
    return machine


def summary(machine: dict) -> str:
    """One line for a results file."""
    versions = ", ".join(
        f"{name.replace('_', '-')} {machine[name]}"
        for name in machine
        if name not in ("cpu", "cores", "torch_threads", "python", "torch", "kernel", "gpu")
    )
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['gpu']}; Python {machine['python']}, torch "
        f"{machine['torch']} ({machine['torch_threads']} threads)" + (f", {versions}" if versions else "")
    )
