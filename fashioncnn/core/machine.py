"""What this machine can do for a run: the device, the precision, and CPU speed-ups that change nothing learned.

`auto` device and precision resolve here (CUDA when present; bf16 where it is native: CPU avx512_bf16 or
amx_bf16, Arm BF16, CUDA with bf16), and so do the CPU tricks: glibc keeping freed memory for the next
step, ReLU after max-pool, linear layers computed weight-first. Each computes the same function as the
plain network; `model` keeps the study's layout for state_dict, printing and parameter counts.
"""

from __future__ import annotations

import ctypes
import logging

import torch
from omegaconf import DictConfig
from torch import nn

from fashioncnn.core.config import Precision

log = logging.getLogger(__name__)



def resolve_device(requested: str, job_num: int | None = None) -> torch.device:
    """`auto` is CUDA when present; for job `job_num` of a sweep on a multi-GPU machine, GPU job_num % count."""
    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        return torch.device("cuda", job_num % count if job_num is not None and count > 1 else 0)
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={requested}: no CUDA device is available here; use device=auto or device=cpu")
    if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        raise RuntimeError(f"device={requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(requested)


def bf16_is_native(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bf16 matmuls and convolutions run in hardware here (elsewhere they are emulated, far slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open(cpuinfo) as file:
            flags = set(file.read().split())
    except OSError:  # not Linux: no way to tell cheaply, so no
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512-BF16 / AMX, or Arm's BF16 extension


def precision_used(requested: object, device: torch.device | None = None) -> str:
    """`auto` as it resolves on `device` (this machine's default device when None): bf16 where native, else fp32."""
    name = getattr(requested, "value", requested)
    if name != "auto":
        return str(name)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "bf16" if bf16_is_native(device) else "fp32"


def use_bf16(cfg: DictConfig, device: torch.device) -> bool:
    """precision=auto: bf16 autocast where bf16 is native, else fp32. precision=bf16: the same, but says so
    in one line where it is not native (emulated bf16 is far slower than fp32)."""
    requested = Precision(cfg.precision)
    if requested is Precision.fp32:
        return False
    if bf16_is_native(device):
        return True
    if requested is Precision.bf16:
        log.warning("precision=bf16: no native bf16 on this %s (emulated bf16 is slower than fp32), training in fp32", device.type)
    return False


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next step instead of handing it back to the kernel.

    Every step frees and re-allocates the same activation and gradient buffers. glibc serves blocks
    over 32 MiB with mmap and unmaps them when freed, so each step page-faults them in again: M1.3's
    79 MB weight gradient and the optimizer's temporaries cost it ~19,000 page faults a step, about
    a fifth of its CPU time. Process-wide, idempotent; False where it does not apply.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl, Windows)
        return False
    m_trim_threshold, m_mmap_threshold, one_gib = -1, -3, 1 << 30
    # No mmap for blocks under 1 GiB (mmapped blocks go back to the kernel when freed), no trimming of
    # the heap's free top under 1 GiB. The working set stays what it was; only its reuse changes.
    done = [libc.mallopt(m_mmap_threshold, one_gib), libc.mallopt(m_trim_threshold, one_gib)]
    return all(done)


def relu_after_pool(model: nn.Module) -> nn.Module:
    """The same network with every ReLU -> MaxPool2d pair run as MaxPool2d -> ReLU.

    Max-pooling and ReLU commute (both monotone), so outputs and gradients are unchanged, bit for bit,
    while the ReLU and its backward touch a quarter of the elements. The layers (and parameters) are
    shared with `model`, which keeps the study's layout for state_dict, printing and parameter counts.
    """
    if not isinstance(model, nn.Sequential):
        return model
    layers = list(model)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.ReLU) and isinstance(layers[i + 1], nn.MaxPool2d):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return nn.Sequential(*layers)


class WeightFirstLinear(nn.Module):
    """An nn.Linear computed as (W @ xᵀ)ᵀ + b instead of x @ Wᵀ + b: the same parameters and function.

    At batch 64 with two or more threads, MKL splits 64 rows times a transposed weight badly between
    its threads and a weight times 64 columns well: M1.3's 3136x6272 layer took 28 ms against 52 ms
    forward, 28 against 53 ms for the input gradient (autograd takes the fast form too, because xᵀ is
    made contiguous). On one thread both forms run alike, and small layers gain nothing.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_columns = x.reshape(-1, x.shape[-1]).t().contiguous()  # like nn.Linear, any leading dimensions
        if self.linear.bias is None:
            y_columns = self.linear.weight @ x_columns
        else:
            y_columns = torch.addmm(self.linear.bias[:, None], self.linear.weight, x_columns)
        return y_columns.t().reshape(*x.shape[:-1], -1)


def training_network(cfg: DictConfig, model: nn.Module, device: torch.device) -> nn.Module:
    """The network train() and evaluate() run: `model`'s own layers and parameters, rearranged for speed.

    The rearrangements compute the same function; `model` keeps the study's layout for state_dict,
    printing and parameter counts.
    """
    network = relu_after_pool(model) if cfg.speed.pool_before_relu else model
    if cfg.speed.weight_first_linear is None or device.type != "cpu" or not isinstance(network, nn.Sequential):
        return network
    return nn.Sequential(*(
        WeightFirstLinear(layer) if isinstance(layer, nn.Linear) and layer.weight.numel() >= cfg.speed.weight_first_linear else layer
        for layer in network
    ))
