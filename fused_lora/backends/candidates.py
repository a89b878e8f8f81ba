"""The ways the Triton backend can compute each primitive ("candidates"),
one of which `tuning.choose` picks per shape.

    forward   fused     one launch: the GEMM with the shrink in its K loop
                        (strategy (a): the shrink recomputed per column tile)
              prepass   the shrink pre-pass (H once per row: dropout and fp32
                        adapters paid once per element of x), then the GEMM
                        with the expand in its epilogue (strategy (b))
              tma       the pre-pass, then a persistent TMA-fed GEMM (Hopper)
              splitk    decode (M <= 16): fused, K split over programs so that
                        every SM reads a share of W, summed in a fixed order
              composed  cuBLAS: addmm, the shrink GEMM, addmm_ in place
                        (Unsloth's path); one adapter, no dropout
    grad_x    fused     G formed in the dX GEMM's N loop (dY read once)
              prepass   G by the shrink kernel, then the dX GEMM
              tma       G by the shrink kernel, then the persistent TMA GEMM
              splitk    decode
              composed  cuBLAS: G = s dY B, dX = dY W, addmm_(G, A)
    reduce    kernel    the split-M reduction kernel (dA, dB)
              composed  torch.mm; one adapter, no dropout

Every candidate computes the same thing with the same dropout mask (the
composed ones only run without dropout), so a pass may use one candidate
and the next pass another.
"""

import dataclasses

import torch
import triton

from ..kernels import gemm_tma
from ..kernels.adapters import LaunchAdapters
from ..kernels.common import INTERPRETED, num_sms
from ..kernels.gemm import lora_gemm
from ..kernels.reduce import lora_reduce
from ..kernels.shrink import lora_shrink
from . import torch_backend

DECODE_ROWS = 16


@dataclasses.dataclass
class Call:
    """One primitive call: its tensors, adapters (batch.Adapters and the
    launch's view of them), rows, seed, precisions and optional outputs."""

    x: torch.Tensor  # x, or dY for grad_x
    weight: torch.Tensor
    bias: torch.Tensor | None
    adapters: object
    launch: LaunchAdapters | None
    rows: object
    seed: int
    base_precision: str
    lora_precision: str
    out: torch.Tensor | None = None
    h_out: torch.Tensor | None = None
    column_scale: torch.Tensor | None = None  # DoRA (forward)
    z_out: torch.Tensor | None = None  # DoRA: receives z = x W^T + s H B^T

    @property
    def row_args(self) -> dict:
        return {} if self.rows is None else dict(order=self.rows.order, ids=self.rows.ids)

    @property
    def composable(self) -> bool:
        """cuBLAS can run it: one adapter, no dropout."""
        return self.rows is None and self.launch is not None and not self.adapters.has_dropout


def split_count(m: int, n: int, k: int, device) -> int:
    """K splits for a decode launch: enough (BLOCK_N = 64)-column tiles times
    splits to fill two waves of the GPU, each split at least 256 deep."""
    if INTERPRETED:
        return 3  # several splits, so that the tests exercise the sum
    tiles = triton.cdiv(n, 64)
    return max(2, min(16, triton.cdiv(2 * num_sms(device), tiles), k // 256))


def _gemm(call: Call, *, dx: bool, compute_y: bool = True, **kwargs):
    return lora_gemm(
        call.x, call.weight, None if dx else call.bias, call.launch, dx=dx, compute_y=compute_y,
        base_precision=call.base_precision, lora_precision=call.lora_precision, seed=call.seed,
        out=call.out, **call.row_args, **kwargs,
    )  # fmt: skip


def _shrink(call: Call, *, dx: bool):
    return lora_shrink(call.x, call.launch, dx=dx, precision=call.lora_precision, seed=call.seed,
                       out=call.h_out, **call.row_args)  # fmt: skip


def _into(pair, call: Call):
    """Results of a candidate that made its own tensors, copied into the
    requested outputs (tests poison those)."""
    y, h = pair
    if call.out is not None and y is not None:
        y = call.out.copy_(y)
    if call.h_out is not None:
        h = call.h_out.copy_(h)
    return y, h


def forward_fused(call: Call):
    return _gemm(call, dx=False, h_out=call.h_out, col_scale=call.column_scale, z_out=call.z_out)


def forward_prepass(call: Call):
    h = _shrink(call, dx=False)
    return _gemm(call, dx=False, h_given=h, col_scale=call.column_scale, z_out=call.z_out)


def forward_tma(call: Call):
    h = _shrink(call, dx=False)
    y = gemm_tma.lora_gemm_tma(call.x, call.weight, call.bias, h, call.launch.up(False), call.launch.scales,
                               dx=False, out=call.out)  # fmt: skip
    return y, h


def forward_splitk(call: Call):
    m, k = call.x.shape
    split = split_count(m, call.weight.shape[0], k, call.x.device)
    return _gemm(call, dx=False, h_out=call.h_out, split_k=split)


def forward_composed(call: Call):
    keep_z = call.z_out is not None
    out = torch_backend.forward(
        call.x, call.weight, call.bias, call.adapters, None, column_scale=call.column_scale, keep_z=keep_z
    )
    if keep_z:
        call.z_out.copy_(out[2])
    return _into(out[:2], call)


def grad_x_fused(call: Call, compute_dx: bool):
    return _gemm(call, dx=True, compute_y=compute_dx, h_out=call.h_out)


def grad_x_prepass(call: Call, compute_dx: bool):
    g = _shrink(call, dx=True)
    return _gemm(call, dx=True, h_given=g) if compute_dx else (None, g)


def grad_x_tma(call: Call, compute_dx: bool):
    g = _shrink(call, dx=True)
    if not compute_dx:
        return None, g
    dx = gemm_tma.lora_gemm_tma(call.x, call.weight, None, g, call.launch.up(True), call.launch.scales, dx=True,
                                out=call.out)  # fmt: skip
    return dx, g


def grad_x_splitk(call: Call, compute_dx: bool):
    m, n = call.x.shape
    split = split_count(m, call.weight.shape[1], n, call.x.device) if compute_dx else 1
    return _gemm(call, dx=True, compute_y=compute_dx, h_out=call.h_out, split_k=split)


def grad_x_composed(call: Call, compute_dx: bool):
    grads = torch_backend.grad_x(call.x, call.weight, call.adapters, None, compute_dx=compute_dx)
    return _into(grads, call)


def reduce_kernel(call: Call, wide, skinny, *, scaled: bool, out):
    rows = call.rows
    kwargs = {} if rows is None else dict(order=rows.order, ids=rows.ids, starts=rows.starts)
    return lora_reduce(wide, skinny, call.launch, scaled=scaled, dropout=not scaled, precision=call.lora_precision,
                       seed=call.seed, out=out, **kwargs)  # fmt: skip


def reduce_composed(call: Call, wide, skinny, *, scaled: bool, out):
    """out[0] (P, R) = s * wide^T skinny (dB) or wide^T skinny (dA^T), by torch.mm."""
    result = torch.mm(wide.t().to(skinny.dtype), skinny)
    if scaled:
        result.mul_(call.adapters.scalings[0])
    return out.copy_(result.unsqueeze(0))


FORWARD = {
    "fused": forward_fused,
    "prepass": forward_prepass,
    "tma": forward_tma,
    "splitk": forward_splitk,
    "composed": forward_composed,
}
GRAD_X = {
    "fused": grad_x_fused,
    "prepass": grad_x_prepass,
    "tma": grad_x_tma,
    "splitk": grad_x_splitk,
    "composed": grad_x_composed,
}
REDUCE = {"kernel": reduce_kernel, "composed": reduce_composed}
CANDIDATES = {"forward": FORWARD, "grad_x": GRAD_X, "reduce": REDUCE}


def eligible(kind: str, call: Call, m: int) -> list[str]:
    """The candidates of `kind` that can run this call."""
    names = list(CANDIDATES[kind])
    if not call.composable:
        names.remove("composed")
    if kind != "reduce" and (m > DECODE_ROWS or call.launch is None or call.column_scale is not None):
        names.remove("splitk")
    if kind != "reduce" and not _tma_eligible(kind, call):
        names.remove("tma")
    if kind != "reduce" and call.launch is None:
        names = ["fused"]  # the plain GEMM: no shrink to place
    return names


def _tma_eligible(kind: str, call: Call) -> bool:
    """The persistent TMA GEMM: one adapter of x's 16-bit dtype, no DoRA, no
    dropout in dX, operands TMA can read (gemm_tma.eligible)."""
    if call.rows is not None or call.launch is None or call.column_scale is not None:
        return False
    if kind == "grad_x" and call.adapters.has_dropout:
        return False
    return gemm_tma.eligible(call.x, call.weight, call.launch.dtype, dx=kind == "grad_x")
