"""What one call computes: its adapters, and with many adapters, which row
uses which. Shared by both backends, the ops and the functional API.

    Adapters:  lora_a[i] (r_i, K), lora_b[i] (N, r_i), dropout_p[i] (floats),
               scalings (n,) a float tensor on the adapters' device (data, not
               constants: a compiled graph serves any value); one adapter:
               lists of one
    Rows:      ids     (M,) int32, each row's adapter (-1: base layer only);
                       sorted when `order` is given
               order   (M,) int32, sorted position -> the caller's row, or None
               starts  (n + 1,) int32, adapter a's rows are sorted positions
                       [starts[a], starts[a + 1]); or None (not sorted)

The rows are never moved: kernels read x and write y through `order`, so the
caller sees its own row order. Sorting makes each tile of consecutive sorted
positions hold few adapters and gives each adapter one run of positions for
the dA / dB reductions. Grouping runs as device ops (argsort, searchsorted)
with no host sync, so torch.compile traces it and a CUDA graph can capture
it; ids given on the CPU are grouped there and copied once.
"""

from typing import NamedTuple

import torch

# A batch of at most this many rows fits in one row tile of every config, so
# sorting it would not reduce the adapters per tile: the forward skips it.
UNSORTED_MAX_ROWS = 16


class Adapters(NamedTuple):
    lora_a: list[torch.Tensor]
    lora_b: list[torch.Tensor]
    scalings: torch.Tensor
    dropout_p: list[float]

    @property
    def count(self) -> int:
        return len(self.lora_a)

    @property
    def width(self) -> int:
        """The widest rank: H and G have this many columns."""
        return max((a.shape[0] for a in self.lora_a), default=0)

    @property
    def has_dropout(self) -> bool:
        return any(p > 0 for p in self.dropout_p)


class Rows(NamedTuple):
    ids: torch.Tensor
    order: torch.Tensor | None = None
    starts: torch.Tensor | None = None

    @property
    def sorted(self) -> bool:
        return self.order is not None

    def grouped(self, num_adapters: int) -> "Rows":
        """These rows sorted by adapter (itself if they are)."""
        return self if self.sorted else group_rows(self.ids, num_adapters, self.ids.device, sort=True)

    def present(self, num_adapters: int) -> list[bool]:
        """Which adapters have rows. Reads the counts back from the ids'
        device: a sync unless they are on the CPU."""
        starts = self.grouped(num_adapters).starts.tolist()
        return [starts[a + 1] > starts[a] for a in range(num_adapters)]


def group_rows(adapter_ids: torch.Tensor, num_adapters: int, device, sort: bool = True) -> Rows:
    """Rows of checked adapter_ids ((M,) integers in [-1, num_adapters)) for
    kernels on `device`: grouped where they are (device ops, or on the host
    for CPU ids), then moved. Always new tensors: refilling the caller's ids
    between the forward and the backward changes nothing."""
    ids = adapter_ids.to(torch.int32)
    if not sort:
        return Rows(ids.to(device, copy=True))
    order = torch.argsort(ids, stable=True).to(torch.int32)
    sorted_ids = ids[order]
    adapters = torch.arange(num_adapters + 1, dtype=torch.int32, device=ids.device)
    starts = torch.searchsorted(sorted_ids, adapters, out_int32=True)
    return Rows(*(t.to(device, non_blocking=True) for t in (sorted_ids, order, starts)))
