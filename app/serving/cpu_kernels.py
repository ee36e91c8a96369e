"""Which kernels run the fp32 linear layers of a model on the CPU: oneDNN's where a start-up timing finds them faster.

MAE_CPU_KERNELS: auto | onednn | onednn-packed | stock. See BENCHMARKS.md for what it is worth on which CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("mae.cpu_kernels")

CpuKernels = Literal["auto", "onednn", "onednn-packed", "stock"]


class OneDNNLinear(nn.Linear):
    """An nn.Linear whose fp32 CPU inference runs oneDNN's matmul instead of PyTorch's default BLAS sgemm.

    Same parameters and state dict; results equal to fp32 rounding (~1e-6). Why: PyTorch's fp32 linear goes to MKL,
    whose sgemm takes its AVX2 path on AMD CPUs; oneDNN uses AVX-512 wherever the CPU has it (BENCHMARKS.md has
    what that is worth). `_packed` (optional) holds the weight pre-reordered into oneDNN's blocked
    layout: a little faster again, for a second copy of the weights.
    """

    _packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile the stock op is traced: inductor chooses its own kernels for it, and it cannot lower
        # mkldnn._linear_pointwise (an AssertionError at warm-up).
        if (
            x.dtype is torch.float32
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        ):
            w = self._packed if self._packed is not None else self.weight
            return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
        return super().forward(x)


def onednn_linear_works() -> bool:
    """oneDNN's linear is in this build and agrees with stock PyTorch on a probe."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=g) for s in ((2, 5, 48), (40, 48), (40,)))
        with torch.inference_mode():
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return torch.allclose(got, F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    except Exception:  # any failure means: keep PyTorch's own kernels
        return False


def onednn_is_faster(layer: nn.Linear, tokens: int = 197, margin: float = 1.05) -> bool:
    """Time the model's widest linear layer on a ViT-sized input (best of 5, each kernel): oneDNN by `margin` or more?

    A few tens of milliseconds at start-up; it keeps PyTorch's kernels on CPUs where they are as fast (MKL on
    Intel AVX-512 parts can be), and picks oneDNN where they are not (AMD).
    """
    x = torch.randn(tokens, layer.in_features)

    def best(fn: Callable[[], torch.Tensor]) -> float:
        fn()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.inference_mode():
        stock = best(lambda: F.linear(x, layer.weight, layer.bias))
        onednn = best(lambda: torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], ""))
    log.info("linear %dx%d on %d tokens: stock %.2f ms, oneDNN %.2f ms", layer.in_features, layer.out_features,
             tokens, stock * 1e3, onednn * 1e3)  # fmt: skip
    return onednn * margin <= stock


def prepare_cpu_kernels(model: nn.Module, kernels: CpuKernels, compiled: bool = False) -> int:
    """Switch the fp32 nn.Linear layers of a CPU model to OneDNNLinear in place; returns how many (0 = unchanged).

    auto: oneDNN if it works here and is faster on the model's widest linear layer (`onednn_is_faster`), and never
    when the stacks are to be compiled (`compiled`): inductor then chooses the kernels of nearly every linear layer.
    """
    if kernels == "stock" or (kernels == "auto" and compiled) or not onednn_linear_works():
        return 0
    layers = [
        m for m in model.modules()
        if type(m) is nn.Linear and m.weight.dtype is torch.float32 and m.weight.device.type == "cpu"
    ]  # fmt: skip
    if not layers:
        return 0
    if kernels == "auto" and not onednn_is_faster(max(layers, key=lambda m: m.weight.numel())):
        return 0
    for m in layers:
        m.__class__ = OneDNNLinear
        if kernels == "onednn-packed":
            # The batch-size hint only steers the layout choice; any batch size runs (and matches) afterwards.
            m._packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 256)
    return len(layers)
