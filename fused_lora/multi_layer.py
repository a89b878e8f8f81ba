"""MultiLoRALinear: one frozen base layer, many named LoRA adapters, a
different adapter for every row of a batch."""

import math
from collections.abc import Sequence

import torch
from torch import nn

from .layer import lora_scaling
from .multi_functional import multi_lora_linear

# PEFT's name for "no adapter" in adapter_names.
BASE_ONLY = "__base__"


class MultiLoRALinear(nn.Module):
    """y_i = x_i W^T + b + scaling[a] * (x_i A_a^T) B_a^T, where row i of the
    batch picks adapter a (or none); W and b frozen, every adapter trainable.

    Parameters, named as in PEFT: `weight` (out, in) and `bias` (out,);
    `lora_A.<name>.weight` (r, in) and `lora_B.<name>.weight` (out, r) for
    each adapter, whose rank r, lora_alpha and scaling (the dicts `r`,
    `lora_alpha`, `scaling`, keyed by name) are its own. `adapter_names`
    lists the adapters in the order adapter_ids index them.

    Forward: `layer(x, adapter_ids)` with integers in [-1, len(adapter_names))
    of x's leading shape or of its batch dimension (-1 = base layer only), or
    PEFT's `layer(x, adapter_names=[...])` with one name per batch entry
    (`"__base__"` = base layer only). All rows run in one fused kernel launch.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_base(base)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "MultiLoRALinear":
        """Wrap an existing nn.Linear, sharing (not copying) its weight and
        bias Parameters, and freeze them. Add adapters with add_adapter()."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_base(linear)
        return layer

    def _init_base(self, linear):
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    @property
    def adapter_names(self) -> list[str]:
        """The adapters' names; adapter_ids index this list."""
        return list(self.lora_A.keys())

    def add_adapter(
        self,
        name: str,
        r: int = 8,
        lora_alpha: float = 8,
        *,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_dtype: torch.dtype | None = None,
    ) -> None:
        """Add adapter `name` with A: (r, in), B: (out, r), scaling
        lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). It gets the
        next index in adapter_names.

        init_lora_weights: True = A kaiming-uniform, B zero (the adapter
        starts as the base layer); "gaussian" = A normal(0, 1/r), B zero;
        False = both random (nn.Linear's init). lora_dtype: the adapter's
        dtype (default: the layer's; all adapters of a layer share one).
        """
        if not isinstance(name, str) or not name or "." in name or name == BASE_ONLY:
            raise ValueError(f"adapter name must be a non-empty str without '.', not {BASE_ONLY!r}; got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} exists already; remove_adapter({name!r}) first")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        dtype = lora_dtype or self.weight.dtype
        existing = {a.weight.dtype for a in self.lora_A.values()}
        if existing and dtype not in existing:
            raise ValueError(f"all adapters of a layer share one dtype: {existing.pop()}, got lora_dtype={dtype}")
        kwargs = dict(bias=False, device=self.weight.device, dtype=dtype)
        lora_a = nn.Linear(self.in_features, r, **kwargs)
        lora_b = nn.Linear(r, self.out_features, **kwargs)
        if init_lora_weights is not False:
            with torch.no_grad():
                if init_lora_weights == "gaussian":
                    nn.init.normal_(lora_a.weight, std=1 / r)
                else:
                    nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
                nn.init.zeros_(lora_b.weight)
        self.lora_A[name] = lora_a
        self.lora_B[name] = lora_b
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_scaling(r, lora_alpha, use_rslora)

    def remove_adapter(self, name: str) -> None:
        """Delete adapter `name`; the adapters after it move down one index."""
        if name not in self.lora_A:
            raise KeyError(f"no adapter {name!r}; adapters: {self.adapter_names}")
        for table in (self.lora_A, self.lora_B, self.r, self.lora_alpha, self.scaling):
            del table[name]

    def ids_from_names(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """PEFT's per-sample adapter names as indices into adapter_names
        ("__base__" -> -1): an int32 tensor on the CPU. Compute it once per
        batch and pass it as adapter_ids to every layer."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names must be a list of str, got {type(adapter_names).__name__}")
        index = {name: i for i, name in enumerate(self.adapter_names)} | {BASE_ONLY: -1}
        for i, name in enumerate(adapter_names):
            if name not in index:
                raise ValueError(
                    f"adapter_names[{i}] = {name!r} is not an adapter of this layer "
                    f"(adapters: {self.adapter_names}; {BASE_ONLY!r} = base layer only)"
                )
        return torch.tensor([index[name] for name in adapter_names], dtype=torch.int32)

    def forward(
        self,
        x: torch.Tensor,
        adapter_ids: torch.Tensor | None = None,
        *,
        adapter_names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """x: (..., in) -> (..., out). Give exactly one of adapter_ids (see
        multi_lora_linear) and adapter_names (one per batch entry, x.shape[0])."""
        if (adapter_ids is None) == (adapter_names is None):
            raise ValueError("pass exactly one of adapter_ids and adapter_names")
        if adapter_names is not None:
            adapter_ids = self.ids_from_names(adapter_names)
        names = self.adapter_names
        return multi_lora_linear(
            x,
            self.weight,
            self.bias,
            [self.lora_A[name].weight for name in names],
            [self.lora_B[name].weight for name in names],
            [self.scaling[name] for name in names],
            adapter_ids,
        )

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{name}: r={self.r[name]}, scaling={self.scaling[name]:g}" for name in self.adapter_names)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"adapters={{{adapters}}}"
        )
