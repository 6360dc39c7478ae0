"""The accelerator a run used, its peak throughput, and the FLOPs of a step: what MFU is made of."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

# dense 16-bit tensor-core peak FLOP/s (vendor data sheets, no sparsity): bf16, or fp16 on the cards without
# bf16 (V100, T4; trainer.precision=fp16), matched against the device name in this order
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
              ("A100", 312e12), ("V100S", 130e12), ("V100-PCIE", 112e12), ("V100", 125e12), (" T4", 65e12))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def accelerator(device: torch.device) -> str:
    """The name runs are grouped by: the GPU's (e.g. NVIDIA H100 80GB HBM3) or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def peak_flops(device: torch.device) -> Optional[float]:
    """The 16-bit peak of a known GPU, None elsewhere (no MFU is reported against a guess)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def count_flops(fn: Callable[[], None]) -> int:
    """The model FLOPs (matrix products and attention, as torch counts them) that one call of fn performs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on the device, so a clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
