"""Grouping a multi-adapter batch's rows by adapter, for both backends.

    adapter_ids: (M,) int32, -1 = base only, else an index into the adapters
                 (given on the CPU, they are sorted and counted there)
    order:       (M,) int32, sorted position -> the caller's row
    sorted_ids:  (M,) int32, adapter_ids[order]

The rows are never moved: the kernels read x and write y through `order`, so
the caller sees its own row order. Sorting only makes each tile of
consecutive sorted positions hold few distinct adapters (its LoRA work grows
with that number), and gives each adapter one contiguous run of positions
for the dA / dB reductions.
"""

import dataclasses

import torch

# A batch of at most this many rows fits in one row tile of every config, so
# sorting it would not reduce the adapters per tile: the forward skips it.
UNSORTED_MAX_ROWS = 16


@dataclasses.dataclass
class RowGroups:
    """The rows of one batch grouped by adapter; see the module docstring.
    `host_ids`: adapter_ids as the caller gave them on the CPU, or None;
    with them, sorting and counting run on the host (no device launch, no
    device sync) and only the results are copied to the device."""

    adapter_ids: torch.Tensor
    num_adapters: int
    host_ids: torch.Tensor | None = None
    order: torch.Tensor | None = None
    sorted_ids: torch.Tensor | None = None
    _segments: list[tuple[int, int, int]] | None = None

    @property
    def sorted(self) -> bool:
        return self.order is not None

    def _ids(self):
        return self.adapter_ids if self.host_ids is None else self.host_ids

    def sort(self) -> "RowGroups":
        """Compute `order` and `sorted_ids` if not done yet (stable: rows of
        one adapter keep the caller's order, so results are reproducible)."""
        if self.order is None:
            ids, device = self._ids(), self.adapter_ids.device
            order = torch.argsort(ids, stable=True)
            self.sorted_ids = ids[order].to(device, non_blocking=True)
            self.order = order.to(device=device, dtype=torch.int32, non_blocking=True)
        return self

    def segments(self) -> list[tuple[int, int, int]]:
        """(adapter, first, last + 1) sorted positions of every adapter that
        has rows, in adapter order. Counts the rows on the host: a device sync,
        once per batch, unless host_ids are known."""
        if self._segments is None:
            self.sort()
            counts = torch.bincount(self._ids() + 1, minlength=self.num_adapters + 1).tolist()
            start, self._segments = counts[0], []  # base-only rows (-1) sort first
            for adapter, count in enumerate(counts[1:]):
                if count:
                    self._segments.append((adapter, start, start + count))
                start += count
        return self._segments


def group_rows(adapter_ids: torch.Tensor, num_adapters: int, device: torch.device, sort: bool = True) -> RowGroups:
    """Group checked adapter_ids ((M,) integers in [-1, num_adapters), on
    `device` or on the CPU) by adapter, for kernels on `device`; `sort=False`
    defers the sort to the first `sort()` call."""
    ids = adapter_ids.to(torch.int32).contiguous()
    host_ids = ids if ids.device.type == "cpu" else None
    groups = RowGroups(ids.to(device, non_blocking=True), num_adapters, host_ids)
    return groups.sort() if sort else groups
