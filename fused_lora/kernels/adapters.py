"""What a launch tells the kernels about the adapters.

Every launch reads the scalings from a device tensor (n,), one per adapter:
a scaling is data, so a hot-swapped adapter with another alpha needs no new
kernel and no new graph.

One adapter: its A (R, K) and B (N, R) go to the kernel as arguments with
their strides, and the dropout p as a float.

Many: adapters stay where they are, and a small table holds each one's A and
B addresses and rank (int64), beside a table of their dropout p. Stacking
them into one padded tensor would copy every adapter on every call (16 MiB
for 64 adapters of r = 16 on a 4096 x 4096 layer), whatever the batch uses.
The tables are built once per set of adapters (cached on their addresses
and p), so a serving or training loop pays no host-to-device copy per call,
and a CUDA graph captured after a first call finds them ready. A and B must
be contiguous and 16-byte aligned (an adapter that is not is copied) so that
their tiles load as vectors.
"""

import functools
import math

import torch


class LaunchAdapters:
    """The adapters of one launch. `width`: the widest rank (H's columns);
    `count`: how many; `rank_multiple`: the largest power of two up to 16
    dividing every rank; `dtype`: the adapters' dtype; `scales`: (n,) fp32
    (fp64 for fp64 adapters) on their device."""

    def __init__(self, lora_a, lora_b, scalings, dropout_p, *, multi: bool):
        self.multi = multi
        self.count = len(lora_a)
        self.dtype = lora_a[0].dtype
        self.width = max(a.shape[0] for a in lora_a)
        self.has_dropout = any(p > 0 for p in dropout_p)
        self.scales = scalings.to(torch.float64 if self.dtype == torch.float64 else torch.float32).contiguous()
        if multi:
            lora_a = [_aligned(a) for a in lora_a]
            lora_b = [_aligned(b) for b in lora_b]
            self.rank_multiple = math.gcd(16, *(a.shape[0] for a in lora_a))
            entries = tuple((a.data_ptr(), b.data_ptr(), a.shape[0]) for a, b in zip(lora_a, lora_b, strict=True))
            self._table = _device_table(
                entries, tuple(float(p) for p in dropout_p), lora_a[0].device, self.scales.dtype
            )
        else:
            self.rank_multiple = 1
            self.dropout_p = float(dropout_p[0])
        self._keep = (lora_a, lora_b)  # the addresses in the table stay valid while this lives

    def down(self, dx: bool) -> torch.Tensor:
        """One adapter's shrink matrix (K, R) in the GEMM's terms: A^T, or B in
        dX. B's rows are R elements apart; when that is not 16 bytes a
        multiple, its tiles cannot load asynchronously in the dX loop, so B is
        read from a copy with padded rows (N x R: a small copy per backward)."""
        lora_a, lora_b = self._keep
        if not dx:
            return lora_a[0].t()
        b = lora_b[0]
        if b.stride(1) == 1 and (b.stride(0) * b.element_size()) % 16 == 0:
            return b
        return padded_rows(b.shape[0], b.shape[1], b.dtype, b.device).copy_(b)

    def up(self, dx: bool) -> torch.Tensor:
        """One adapter's expand matrix (R, N): B^T, or A in dX."""
        lora_a, lora_b = self._keep
        return lora_a[0] if dx else lora_b[0].t()

    def table_args(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(entries (n, 3) int64, dropout p (n,) float) on the adapters' device."""
        return self._table


def padded_rows(m: int, r: int, dtype, device) -> torch.Tensor:
    """An (m, r) tensor whose rows start 16 bytes apart or a multiple of it
    (a view of a wider buffer): loads of whole rows stay vectorised and
    asynchronous whatever the rank."""
    per_16_bytes = max(1, 16 // dtype.itemsize)
    width = -(-max(r, 1) // per_16_bytes) * per_16_bytes
    return torch.empty((m, width), dtype=dtype, device=device)[:, :r]


def _aligned(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


@functools.lru_cache(maxsize=256)
def _device_table(entries, dropout_p, device, float_dtype):
    return (
        torch.tensor(entries, dtype=torch.int64, device=device),
        torch.tensor(dropout_p, dtype=float_dtype, device=device),
    )
