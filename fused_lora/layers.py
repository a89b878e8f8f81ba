"""LoRALinear (one adapter) and MultiLoRALinear (many, one per row): drop-ins
for nn.Linear over a frozen base weight, with PEFT's parameter names."""

import math
import sys
from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .checks import cannot_read_on_host, check_dropout, check_scaling
from .functional import dora_linear, dora_weight_norm, lora_linear, multi_lora_linear
from .integrations import quantized as quant

# PEFT's name for "no adapter" in adapter_names.
BASE_ONLY = "__base__"
INITS = (True, False, "gaussian")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    check_scaling("lora_alpha", lora_alpha)
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def is_conv1d(module) -> bool:
    """True for transformers' Conv1D (GPT-2 and relatives): y = x W + b with W
    stored (in, out), PEFT's fan_in_fan_out. Looked up only when transformers
    is imported already: without it no Conv1D can exist."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def base_features(module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (weight (in, out))."""
    if is_conv1d(module):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


@torch.no_grad()
def copy_padded(target: torch.Tensor, source: torch.Tensor) -> None:
    """target <- source in its leading corner, zeros elsewhere, in place: an
    adapter of rank r into tensors of a larger rank (A (R, in), B (out, R))."""
    target.zero_()
    target[tuple(slice(0, size) for size in source.shape)].copy_(source)


def check_rank(r, name: str = "r") -> None:
    """A positive int (a bool is not one), else a ValueError naming the argument."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{name} must be a positive integer, got {r!r}")


def _is_pissa(init) -> bool:
    return isinstance(init, str) and (
        init == "pissa" or (init.startswith("pissa_niter_") and init.removeprefix("pissa_niter_").isdecimal())
    )


@torch.no_grad()
def init_adapter(lora_a: nn.Linear, lora_b: nn.Linear, init_lora_weights) -> None:
    """PEFT's inits: True = A kaiming-uniform and B zero (the layer starts
    equal to the base layer), "gaussian" = A normal(0, 1/r) and B zero,
    False = both left with nn.Linear's random init (a non-zero update).
    A lora_B bias (lora_bias) is zeroed with B."""
    if init_lora_weights is False:
        return
    if init_lora_weights == "gaussian":
        nn.init.normal_(lora_a.weight, std=1 / lora_a.weight.shape[0])
    else:
        nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
    nn.init.zeros_(lora_b.weight)
    if lora_b.bias is not None:
        nn.init.zeros_(lora_b.bias)


class DoRAMagnitude(nn.Module):
    """DoRA's magnitude m (out,) as PEFT holds it: a module whose `weight`
    is the trainable vector, so that the layer's parameter is named
    `lora_magnitude_vector.weight`."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        # A Parameter is kept as it is (shared, e.g. with a PEFT layer's), a tensor becomes one.
        self.weight = magnitude if isinstance(magnitude, nn.Parameter) else nn.Parameter(magnitude)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


class _FrozenBase(nn.Module):
    """What both LoRA layers share: the base layer's `weight` (out, in) and
    `bias` (out,), frozen and shared with the nn.Linear they came from (or,
    for LoRALinear, with a transformers Conv1D: `weight` (in, out),
    fan_in_fan_out), the scalings as a non-persistent float buffer (data
    that a compiled graph reads, so changing a scaling needs no recompile;
    fp32, fp64 for fp64 adapters, whatever .to(dtype) does to the module),
    and merge / unmerge of an update into the weight and bias.

    The base may be quantized (a bitsandbytes NF4 Linear4bit, a transformers
    FP8Linear, or fused_lora.quantize_base): `weight` is then the packed
    Parameter, shared and frozen, with its statistics beside it, and `_quant`
    describes it (integrations/quantized.py); None for a dense base."""

    def _init_base(self, linear: nn.Module, accept_conv1d: bool = False) -> None:
        self.fan_in_fan_out = accept_conv1d and is_conv1d(linear)
        if not isinstance(linear, nn.Linear) and not self.fan_in_fan_out:
            expected = "an nn.Linear or a transformers Conv1D" if accept_conv1d else "an nn.Linear"
            raise TypeError(f"linear must be {expected}, got {type(linear).__name__}")
        self._quant = quant.quantized_base(linear)
        if self._quant is None:
            self.weight = linear.weight
        else:  # the packed weight and its statistics, shared
            quant.attach(self, linear, self._quant)
        self.bias = linear.bias
        self.out_features, self.in_features = self.linear_weight.shape
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._unmerged_weight: torch.Tensor | None = None
        self._unmerged_bias: torch.Tensor | None = None
        self._scaling_values: list[float] = []
        self.register_buffer("_scalings", self._scalings_tensor(self.weight.dtype), persistent=False)

    def _scalings_tensor(self, adapter_dtype, device=None) -> torch.Tensor:
        dtype = torch.float64 if adapter_dtype == torch.float64 else torch.float32
        return torch.tensor(self._scaling_values, dtype=dtype, device=device or self.weight.device)

    def _adapter_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def _reset_scalings(self) -> None:
        self._scalings = self._scalings_tensor(self._adapter_dtype(), self._scalings.device)

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) would round the scalings: rebuild them from the
        # exact values, in the adapters' (possibly new) precision.
        super()._apply(fn, recurse)
        self._reset_scalings()
        return self

    @property
    def linear_weight(self) -> torch.Tensor:
        """The base weight as nn.Linear holds it, (out, in): `weight` itself,
        or its transpose (a view, no copy) for a Conv1D base (fan_in_fan_out);
        for a quantized base a QuantizedWeight viewing the packed tensors (no
        copy), decoded into the dtype it was quantized from."""
        if self._quant is not None:
            return self._quant.view(self)
        return self.weight.t() if self.fan_in_fan_out else self.weight

    @property
    def base_format(self) -> str | None:
        """The quantized base's format, "nf4" or "fp8"; None for a dense base."""
        return None if self._quant is None else self._quant.format

    def _default_lora_dtype(self) -> torch.dtype:
        # Over a quantized base the adapters are float32, as PEFT's QLoRA adapters.
        return self.weight.dtype if self._quant is None else torch.float32

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._quant is not None:  # NF4 statistics under bitsandbytes' keys
            self._quant.save_state(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)
        if self._quant is not None:
            self._quant.load_state(self, state_dict, prefix, missing_keys if strict else [], unexpected, errors)

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    @torch.no_grad()
    def _merge_delta(self, delta: torch.Tensor, bias_delta: torch.Tensor | None = None) -> None:
        """W <- W + delta (delta in `weight`'s layout) and bias <- bias +
        bias_delta, in place on the (possibly shared) tensors, computed in
        float32 (float64 for a float64 weight) and rounded once. The originals
        are kept (copies) so that unmerge() restores them bit for bit. A
        quantized base: NF4 is decoded, updated and quantized again (lossy,
        warns; unmerge() still restores the packed original), FP8 raises."""
        if self._quant is not None:
            self._quant.merge(self, delta, bias_delta)
            return
        wide = torch.promote_types(self.weight.dtype, torch.float32)
        self._merge_weight(self.weight.to(wide) + delta.to(wide), bias_delta)

    @torch.no_grad()
    def _merge_weight(self, new_weight: torch.Tensor, bias_delta: torch.Tensor | None = None) -> None:
        """W <- new_weight (in `weight`'s layout, rounded once), as _merge_delta."""
        self._unmerged_weight = self.weight.detach().clone()
        wide = torch.promote_types(self.weight.dtype, torch.float32)
        self.weight.copy_(new_weight)
        if bias_delta is not None:
            self._unmerged_bias = self.bias.detach().clone()
            self.bias.copy_(self.bias.to(wide) + bias_delta.to(wide))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight (and bias) saved by merge(), exactly."""
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        if self._quant is not None:  # the statistics that go with the packed weight
            self._quant.restore(self)
        if self._unmerged_bias is not None:
            self.bias.copy_(self._unmerged_bias)
            self._unmerged_bias = None

    def _delta(self, lora_a: nn.Linear, lora_b: nn.Linear, scaling: float) -> torch.Tensor:
        wide = torch.promote_types(self.weight.dtype if self._quant is None else self._quant.dtype, torch.float32)
        return scaling * (lora_b.weight.to(wide) @ lora_a.weight.to(wide))


class LoRALinear(_FrozenBase):
    """y = x W^T + b + scaling * ((d A^T) B^T + b_B), with W and b frozen and
    d = dropout(x) on the LoRA branch in training mode.

    Parameters, named as in PEFT: `weight` (out, in) and `bias` (out,) frozen;
    `lora_A.weight` (r, in) and `lora_B.weight` (out, r) trainable, and with
    lora_bias=True `lora_B.bias` (out,) = b_B, trainable (PEFT's lora_bias:
    the layer adds scaling * b_B, also over a base layer without a bias).
    scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora); it reads
    as a float and can be set (it is kept as data, see _FrozenBase).
    lora_dropout: in training mode, dropout with this p on the LoRA branch's
    input, fused into the kernels (the backward regenerates the mask from a
    seed drawn per call); none in eval mode.

    init_lora_weights: True (default) = A kaiming-uniform, B (and b_B) zero,
    so the layer starts equal to the base layer; "gaussian" = A normal(0,
    1/r), B zero; "pissa" (PiSSA, as PEFT) = A and B from the top-r singular
    triplets of W, so that scaling * B A is W's best rank-r part, and W
    replaced in place by the residual W - scaling * B A (the output is
    unchanged, but the base weight, possibly shared, changes);
    "pissa_niter_<n>" = the same from torch.svd_lowrank with n subspace
    iterations (faster, randomised); False = all left with nn.Linear's random
    init (a non-zero update, for tests). lora_bias needs True or False, as
    in PEFT.
    lora_dtype: the adapters' dtype (default: the layer's);
    float32 adapters on a bf16 / fp16 layer compute the LoRA branch in fp32.

    fan_in_fan_out (read-only) is True for a layer made by from_linear from
    a transformers Conv1D (GPT-2): `weight` is then that Conv1D's (in, out)
    Parameter, shared as it is, and `linear_weight` its (out, in) view.

    r is the rank of the adapter the layer holds (what scaling, PEFT's config
    and save_adapter use); max_rank, the rank of the lora_A / lora_B tensors,
    is larger only after prepare_for_hotswap padded them with zeros.

    use_dora=True makes it PEFT's DoRA (weight-decomposed LoRA):
    y = (m / n) * (x W^T + scaling * (x A^T) B^T) + b, n_j = ||W_j + scaling
    B_j A|| (a constant of the backward, as in PEFT), with the magnitude m
    (out,) trainable as `lora_magnitude_vector.weight`, initialised to n so
    that the layer starts equal to its base. m / n is applied in the fused
    kernel's epilogue; n comes from skinny products (W A^T, A A^T) and a
    cached ||W_j||^2, never from W + scaling B A. With dropout in training
    mode the LoRA branch reads dropout(x) as in PEFT (composed, not one
    kernel). DoRA takes neither lora_bias (as PEFT) nor hot-swapping.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_dtype: torch.dtype | None = None,
        lora_bias: bool = False,
        use_dora: bool = False,
    ):
        super().__init__()
        # The base layer exactly as nn.Linear builds it, then frozen.
        self._init_base(nn.Linear(in_features, out_features, bias, device=device, dtype=dtype))
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_dtype, lora_bias, use_dora)

    @classmethod
    def from_linear(cls, linear: nn.Module, **lora_kwargs) -> "LoRALinear":
        """Wrap an existing nn.Linear, or a transformers Conv1D (GPT-2's
        layers, weight stored (in, out): the layer has fan_in_fan_out=True);
        lora_kwargs are the constructor's keyword arguments (r, lora_alpha,
        lora_dropout, use_rslora, init_lora_weights, lora_dtype, lora_bias,
        use_dora).
        The new layer shares (does not copy) the module's weight and bias
        Parameters and freezes them; merge() changes them in place, as PEFT
        does. A quantized module (a bitsandbytes NF4 Linear4bit, a
        transformers FP8Linear) stays quantized: see docs/quantized.md."""
        layer = cls.__new__(cls)
        _FrozenBase.__init__(layer)
        layer._init_base(linear, accept_conv1d=True)
        layer._init_lora(**lora_kwargs)
        return layer

    @staticmethod
    def check_arguments(
        in_features,
        out_features,
        r,
        lora_alpha,
        lora_dropout,
        use_rslora,
        init_lora_weights,
        lora_bias=False,
        use_dora=False,
    ):
        """Raise, naming the argument, for LoRA arguments the layer cannot take
        (apply_lora checks every module this way before changing any)."""
        check_rank(r)
        lora_scaling(r, lora_alpha, use_rslora)  # a NaN or infinite lora_alpha raises here
        check_dropout("lora_dropout", lora_dropout)
        if init_lora_weights not in INITS and not _is_pissa(init_lora_weights):
            raise ValueError(
                "init_lora_weights must be True, False, 'gaussian', 'pissa' or 'pissa_niter_<n>', "
                f"got {init_lora_weights!r}"
            )
        if _is_pissa(init_lora_weights) and r > min(in_features, out_features):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} needs r <= min(in, out), got r={r}")
        if not isinstance(lora_bias, bool):
            raise TypeError(f"lora_bias must be a bool, got {type(lora_bias).__name__}")
        if lora_bias and init_lora_weights not in (True, False):
            raise ValueError(
                f"lora_bias=True needs init_lora_weights True or False (as in PEFT), got {init_lora_weights!r}"
            )
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {type(use_dora).__name__}")
        if use_dora and lora_bias:
            raise ValueError("lora_bias=True is not supported with use_dora=True (PEFT refuses it too)")

    def _init_lora(
        self,
        r=8,
        lora_alpha=8,
        lora_dropout=0.0,
        use_rslora=False,
        init_lora_weights=True,
        lora_dtype=None,
        lora_bias=False,
        use_dora=False,
    ):
        self.check_arguments(
            self.in_features,
            self.out_features,
            r,
            lora_alpha,
            lora_dropout,
            use_rslora,
            init_lora_weights,
            lora_bias,
            use_dora,
        )
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.use_rslora = use_rslora
        kwargs = dict(device=self.weight.device, dtype=lora_dtype or self._default_lora_dtype())
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kwargs)
        self.lora_B = nn.Linear(r, self.out_features, bias=lora_bias, **kwargs)
        self.lora_magnitude_vector = DoRAMagnitude(torch.empty(self.out_features, **kwargs)) if use_dora else None
        self._norm_sq_cache: tuple = (None, None)  # (W's key, ||W_j||^2)
        self._norm_cache: tuple = (None, None)  # (W, A, B and scaling's key, n)
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.reset_lora_parameters(init_lora_weights)

    def _adapter_dtype(self) -> torch.dtype:
        return self.lora_A.weight.dtype

    @property
    def lora_bias(self) -> bool:
        """PEFT's lora_bias: whether lora_B has a bias b_B (out,)."""
        return self.lora_B.bias is not None

    @property
    def use_dora(self) -> bool:
        """Whether the layer is DoRA (has a magnitude, `lora_magnitude_vector`)."""
        return self.lora_magnitude_vector is not None

    def _weight_key(self) -> tuple:
        w = self.weight  # the stored tensor (packed for a quantized base)
        return (w.data_ptr(), w._version, w.device, w.dtype)

    def weight_norm_sq(self) -> torch.Tensor:
        """||W_j||^2 (out,) in float32 (float64 for a float64 weight), what
        DoRA's row norms start from: cached while the weight is unchanged
        (same storage, same version), recomputed after merge, PiSSA, a move."""
        key = self._weight_key()
        if self._norm_sq_cache[0] != key:
            with torch.no_grad():
                dense = self._dense_weight(torch.float64 if self.weight.dtype == torch.float64 else torch.float32)
                self._norm_sq_cache = (key, dense.square().sum(1))
        return self._norm_sq_cache[1]

    def weight_norm(self) -> torch.Tensor:
        """DoRA's n (out,): the row norms ||W_j + scaling B_j A||, detached;
        cached while W, A, B and the scaling are unchanged (an optimizer step
        changes A and B: a training step computes it once, from skinny
        products; inference once for all)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        key = (self._weight_key(), a.data_ptr(), a._version, b.data_ptr(), b._version, self.scaling)
        if self._norm_cache[0] != key:
            norm = dora_weight_norm(self.linear_weight, a, b, self.scaling, self.weight_norm_sq())
            self._norm_cache = (key, norm)
        return self._norm_cache[1]

    @property
    def max_rank(self) -> int:
        """The rank of the lora_A / lora_B tensors: r, or what prepare_for_hotswap padded them to."""
        return self.lora_A.weight.shape[0]

    @property
    def scaling(self) -> float:
        return self._scaling_values[0]

    @scaling.setter
    def scaling(self, value: float) -> None:
        check_scaling("scaling", value)
        self._scaling_values = [float(value)]
        if self._scalings.numel() == 1:
            self._scalings.fill_(float(value))  # in place: a compiled graph reads the new value
        else:
            self._reset_scalings()

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """Initialise A and B as PEFT does (see the class docstring). "pissa"
        also rewrites the weight in place (the residual)."""
        if self.max_rank != self.r:
            raise ValueError(
                f"the adapter tensors are padded to max_rank={self.max_rank} for hot-swapping (r={self.r}): "
                "load an adapter into them with hotswap_adapter instead"
            )
        if self._quant is not None:  # PiSSA and DoRA need a dense base
            quant.check_lora_options(self._quant, "LoRALinear", init_lora_weights)
        self.check_arguments(
            self.in_features,
            self.out_features,
            self.r,
            self.lora_alpha,
            0.0,
            False,
            init_lora_weights,
            self.lora_bias,
            self.use_dora,
        )
        # Remembered for adapter configs: a PiSSA adapter only fits PiSSA's residual weight.
        self.init_lora_weights = init_lora_weights
        if not _is_pissa(init_lora_weights):
            init_adapter(self.lora_A, self.lora_B, init_lora_weights)
        else:
            self._init_pissa(init_lora_weights)
        if self.use_dora:  # m = n: the layer starts as its LoRA layer would
            self.lora_magnitude_vector.weight.copy_(self.weight_norm())

    @torch.no_grad()
    def _init_pissa(self, init_lora_weights: str) -> None:
        # The SVD runs in fp32 (fp64 stays fp64) whatever W's dtype; W is rounded once, at the end.
        w = self.linear_weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        if init_lora_weights == "pissa":
            u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
            u, sigma, vh = u[:, : self.r], sigma[: self.r], vh[: self.r]
        else:
            niter = int(init_lora_weights.removeprefix("pissa_niter_"))
            u, sigma, v = torch.svd_lowrank(w, q=self.r, niter=niter)
            vh = v.T
        # Split sigma / scaling evenly between A (r, in) and B (out, r), so scaling * B A = U_r S_r V_r^T.
        root = torch.diag(torch.sqrt(sigma / self.scaling))
        lora_a, lora_b = root @ vh, u @ root
        self.lora_A.weight.copy_(lora_a)
        self.lora_B.weight.copy_(lora_b)
        self.linear_weight.copy_(w - (self.scaling * lora_b) @ lora_a)

    @torch.no_grad()
    def pad_rank(self, max_rank: int) -> None:
        """Grow lora_A to (max_rank, in) and lora_B to (out, max_rank), the new
        rows / columns zero, so that hotswap_adapter can later load adapters
        of any rank up to max_rank in place. The output is unchanged, and r
        stays the adapter's rank. The tensors become new Parameters (same
        requires_grad): pad before building an optimizer or compiling."""
        check_rank(max_rank, "max_rank")
        if self.use_dora:
            raise NotImplementedError("hot-swapping DoRA adapters is not supported (pad_rank on a use_dora layer)")
        if max_rank < self.r:
            raise ValueError(f"max_rank must be >= the adapter's rank r={self.r}, got {max_rank}")
        if max_rank <= self.max_rank:
            return
        for module, dim in ((self.lora_A, 0), (self.lora_B, 1)):
            old = module.weight
            shape = list(old.shape)
            shape[dim] = max_rank
            padded = old.new_empty(shape)
            copy_padded(padded, old)
            module.weight = nn.Parameter(padded, requires_grad=old.requires_grad)
        self.lora_A.out_features = self.lora_B.in_features = max_rank

    def get_delta_weight(self) -> torch.Tensor:
        """scaling * B A in `weight`'s layout ((out, in); (in, out) for a
        Conv1D base, as PEFT's), in float32 (float64 for a float64 layer)."""
        delta = self._delta(self.lora_A, self.lora_B, self.scaling)
        return delta.t() if self.fan_in_fan_out else delta

    def check_mergeable(self) -> None:
        """Raise RuntimeError, as PEFT does, where merge() cannot fold the
        adapter into the base layer: lora_bias over a base without a bias."""
        if self.lora_bias and self.bias is None:
            raise RuntimeError(
                "cannot merge: lora_bias=True adds scaling * lora_B.bias to the base bias, and the base layer has "
                "no bias (PEFT refuses this merge too)"
            )

    def merge(self) -> None:
        """W <- W + scaling * B A (and bias <- bias + scaling * b_B with
        lora_bias), in place on the (possibly shared) tensors, computed in
        float32 (float64 for a float64 layer) and rounded once. The originals
        are kept (copies) so that unmerge() restores them bit for bit. A
        merged layer's forward is one GEMM. A DoRA layer merges as PEFT's:
        W <- (m / n) (W + scaling B A)."""
        if self.merged:
            return
        self.check_mergeable()
        delta = self.get_delta_weight()
        if self.use_dora:  # W <- (m / n) (W + scaling B A) = W + ((m / n) - 1) W + (m / n) delta, n unmerged
            with torch.no_grad():
                w = self._dense_weight(delta.dtype)
                c = (self.lora_magnitude_vector.weight.to(delta.dtype) / self.weight_norm().to(delta.dtype))[:, None]
                linear_delta = (c - 1) * w + c * (delta.t() if self.fan_in_fan_out else delta)
            delta = linear_delta.t() if self.fan_in_fan_out else linear_delta
            self._merge_delta(delta)
            return
        self._merge_delta(delta, self.scaling * self.lora_B.bias.to(delta.dtype) if self.lora_bias else None)

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight (out, in) as a dense tensor of `dtype` (a quantized base decoded)."""
        if self._quant is not None:
            return self._quant.view(self).dequantize(dtype)
        return self.linear_weight.to(dtype)

    def _forward_bias(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The bias the fused op adds: the base bias, plus scaling * b_B with
        lora_bias (an N-element op in float32 or wider, rounded once to the
        layer's dtype, or `dtype`; autograd carries scaling * sum(dY) back to b_B)."""
        if not self.lora_bias:
            return self.bias
        shift = self._scalings * self.lora_B.bias  # (1,) * (N,): the scaling stays data under torch.compile
        return (shift if self.bias is None else self.bias + shift).to(dtype or self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._quant is not None:  # decoded into x's dtype inside the kernels
            weight = self._quant.view(self, getattr(x, "dtype", None))
            if self.merged:  # a dense temporary per call
                return F.linear(x, weight.dequantize(), self.bias)
        else:
            weight = self.linear_weight
            if self.merged:  # the update is already in W
                return F.linear(x, weight, self.bias)
        dropout_p = self.lora_dropout if self.training else 0.0  # eval mode has no dropout
        if self.use_dora:
            return dora_linear(
                x,
                weight,
                self.bias,
                self.lora_A.weight,
                self.lora_B.weight,
                self._scalings,
                self.lora_magnitude_vector.weight,
                dropout_p=dropout_p,
                weight_norm=None if torch.compiler.is_compiling() else self.weight_norm(),
            )
        return lora_linear(
            x,
            weight,
            self._forward_bias(weight.dtype),
            self.lora_A.weight,
            self.lora_B.weight,
            self._scalings,
            dropout_p=dropout_p,
        )

    def extra_repr(self) -> str:
        extras = ", lora_bias=True" if self.lora_bias else ""
        extras += ", use_dora=True" if self.use_dora else ""
        extras += ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        extras += f", base={self.base_format}" if self._quant is not None else ""
        extras += f", max_rank={self.max_rank}" if self.max_rank != self.r else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}{extras}, merged={self.merged}"
        )


class MultiLoRALinear(_FrozenBase):
    """y_i = x_i W^T + b + scaling[a] * (d_i A_a^T) B_a^T, where row i of the
    batch picks adapter a (or none); W and b frozen, every adapter trainable.

    Parameters, named as in PEFT: `weight` (out, in) and `bias` (out,);
    `lora_A.<name>.weight` (r, in) and `lora_B.<name>.weight` (out, r) for
    each adapter, whose rank r, lora_alpha, lora_dropout and scaling (the
    dicts `r`, `lora_alpha`, `lora_dropout`, `scaling`, keyed by name) are
    its own. `adapter_names` lists the adapters in the order adapter_ids
    index them.

    Forward: `layer(x, adapter_ids)` with integers in [-1, len(adapter_names))
    of x's leading shape or of its batch dimension (-1 = base layer only), or
    PEFT's `layer(x, adapter_names=[...])` with one name per batch entry
    (`"__base__"` = base layer only), or `layer(x)`: every row on
    `active_adapter` (None by default: then this is a ValueError), or on the
    names that `fused_lora.adapter_names(model, names)` set for a whole
    model. All rows run in one fused kernel launch.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self._init_base(nn.Linear(in_features, out_features, bias, device=device, dtype=dtype))
        self._init_adapters()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "MultiLoRALinear":
        """Wrap an existing nn.Linear, sharing (not copying) its weight and
        bias Parameters, and freeze them. Add adapters with add_adapter()."""
        layer = cls.__new__(cls)
        _FrozenBase.__init__(layer)
        layer._init_base(linear)
        layer._init_adapters()
        return layer

    def _init_adapters(self) -> None:
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self._active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self._batch_names: Sequence[str] | None = None  # set by fused_lora.adapter_names
        self._batch_ids: torch.Tensor | None = None

    def _adapter_dtype(self) -> torch.dtype:
        return next(iter(self.lora_A.values())).weight.dtype if self.lora_A else self.weight.dtype

    @property
    def adapter_names(self) -> list[str]:
        """The adapters' names; adapter_ids index this list."""
        return list(self.lora_A.keys())

    @property
    def scaling(self) -> dict[str, float]:
        return dict(zip(self.adapter_names, self._scaling_values, strict=True))

    @property
    def active_adapter(self) -> str | None:
        """The adapter of every row when a call names none: None (then such a
        call raises), an adapter's name, or "__base__" (the base layer)."""
        return self._active_adapter

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        if name is not None and name != BASE_ONLY and name not in self.lora_A:
            raise ValueError(f"no adapter {name!r}; adapters: {self.adapter_names} (or None, {BASE_ONLY!r})")
        self._active_adapter = name

    def add_adapter(
        self,
        name: str,
        r: int = 8,
        lora_alpha: float = 8,
        *,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_dtype: torch.dtype | None = None,
    ) -> None:
        """Add adapter `name` with A: (r, in), B: (out, r), scaling
        lora_alpha / r (lora_alpha / sqrt(r) with use_rslora) and dropout
        lora_dropout on its rows' LoRA input in training mode. It gets the
        next index in adapter_names. init_lora_weights: True, "gaussian" or
        False, as in LoRALinear. lora_dtype: the adapter's dtype (default:
        the layer's; all adapters of a layer share one)."""
        if not isinstance(name, str) or not name or "." in name or name == BASE_ONLY:
            raise ValueError(f"adapter name must be a non-empty str without '.', not {BASE_ONLY!r}; got {name!r}")
        check_rank(r)
        check_dropout("lora_dropout", lora_dropout)
        lora_scaling(r, lora_alpha, use_rslora)  # a NaN or infinite lora_alpha raises here
        if init_lora_weights not in INITS:
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        kwargs = dict(bias=False, device=self.weight.device, dtype=lora_dtype or self._default_lora_dtype())
        lora_a, lora_b = nn.Linear(self.in_features, r, **kwargs), nn.Linear(r, self.out_features, **kwargs)
        init_adapter(lora_a, lora_b, init_lora_weights)
        self.attach_adapter(name, lora_a, lora_b, lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)

    def attach_adapter(
        self,
        name: str,
        lora_a: nn.Linear,
        lora_b: nn.Linear,
        lora_alpha: float,
        *,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        scaling: float | None = None,
    ) -> None:
        """Add adapter `name` holding these very lora_A (r, in) / lora_B
        (out, r) modules (shared, not copied: from_peft uses it), with
        `scaling` (default lora_alpha / r, or / sqrt(r) with use_rslora)."""
        r, dtype = lora_a.weight.shape[0], lora_a.weight.dtype
        if lora_b.bias is not None:
            raise NotImplementedError(
                f"adapter {name!r}: lora_B has a bias (lora_bias=True), which MultiLoRALinear does not support "
                "(LoRALinear does: one adapter per layer)"
            )
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} exists already; remove_adapter({name!r}) first")
        if self.lora_A and dtype != self._adapter_dtype():
            raise ValueError(
                f"all adapters of a layer share one dtype: {self._adapter_dtype()}, got lora_dtype={dtype}"
            )
        if self.merged:
            raise ValueError(f"adapter {self.merged_adapter!r} is merged: unmerge() before adding adapters")
        if tuple(lora_a.weight.shape) != (r, self.in_features) or tuple(lora_b.weight.shape) != (self.out_features, r):
            raise ValueError(
                f"adapter {name!r}: lora_A must be ({r}, {self.in_features}), lora_B ({self.out_features}, {r})"
            )
        scaling = lora_scaling(r, lora_alpha, use_rslora) if scaling is None else scaling
        check_scaling(f"scaling of adapter {name!r}", scaling)
        self.lora_A[name], self.lora_B[name] = lora_a, lora_b
        self.r[name], self.lora_alpha[name], self.lora_dropout[name] = r, lora_alpha, lora_dropout
        self.use_rslora[name] = use_rslora
        self._scaling_values.append(float(scaling))
        self._reset_scalings()

    def adapter_view(self, name: str) -> SimpleNamespace:
        """Adapter `name` with LoRALinear's attribute names (r, lora_alpha,
        lora_dropout, use_rslora, scaling, init_lora_weights, lora_bias,
        use_dora, fan_in_fan_out, lora_A, lora_B): what a PEFT config or an adapter file
        reads."""
        return SimpleNamespace(
            r=self.r[name],
            lora_alpha=self.lora_alpha[name],
            lora_dropout=self.lora_dropout[name],
            use_rslora=self.use_rslora[name],
            scaling=self.scaling[name],
            init_lora_weights=True,
            lora_bias=False,
            use_dora=False,
            fan_in_fan_out=False,
            lora_A=self.lora_A[name],
            lora_B=self.lora_B[name],
        )

    def remove_adapter(self, name: str) -> None:
        """Delete adapter `name`; the adapters after it move down one index."""
        if name not in self.lora_A:
            raise KeyError(f"no adapter {name!r}; adapters: {self.adapter_names}")
        if name == self.merged_adapter:
            raise ValueError(f"adapter {name!r} is merged: unmerge() before removing it")
        del self._scaling_values[self.adapter_names.index(name)]
        for table in (self.lora_A, self.lora_B, self.r, self.lora_alpha, self.lora_dropout, self.use_rslora):
            del table[name]
        if self._active_adapter == name:
            self._active_adapter = None
        self._reset_scalings()

    def ids_from_names(self, adapter_names: Sequence[str], *, missing_as_base: bool = False) -> torch.Tensor:
        """PEFT's per-sample adapter names as indices into adapter_names
        ("__base__" -> -1): an int32 tensor on the CPU. A name this layer
        lacks raises, or with missing_as_base means the base layer (PEFT's
        rule for a model whose adapters target different layers)."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names must be a list of str, got {type(adapter_names).__name__}")
        index = {name: i for i, name in enumerate(self.adapter_names)} | {BASE_ONLY: -1}
        for i, name in enumerate(adapter_names):
            if name not in index and not missing_as_base:
                raise ValueError(
                    f"adapter_names[{i}] = {name!r} is not an adapter of this layer "
                    f"(adapters: {self.adapter_names}; {BASE_ONLY!r} = base layer only)"
                )
        return torch.tensor([index.get(name, -1) for name in adapter_names], dtype=torch.int32)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """scaling[name] * B A of one adapter: (out, in), in float32 (float64 for a float64 layer)."""
        return self._delta(self.lora_A[name], self.lora_B[name], self.scaling[name])

    def merge(self, name: str) -> None:
        """Fold adapter `name` into the (possibly shared) weight, as
        LoRALinear.merge does; unmerge() restores W bit for bit. While merged,
        a batch naming any other adapter, or the base layer (-1), raises
        (PEFT raises likewise): the base weight is no longer there."""
        if name not in self.lora_A:
            raise KeyError(f"no adapter {name!r}; adapters: {self.adapter_names}")
        if self.merged:
            if name == self.merged_adapter:
                return
            raise ValueError(f"adapter {self.merged_adapter!r} is merged: unmerge() before merging {name!r}")
        self._merge_delta(self.get_delta_weight(name))
        self.merged_adapter = name

    def unmerge(self) -> None:
        super().unmerge()
        self.merged_adapter = None

    def _row_ids(self, x, adapter_ids, adapter_names) -> torch.Tensor:
        if adapter_ids is not None and adapter_names is not None:
            raise ValueError("pass at most one of adapter_ids and adapter_names")
        if adapter_names is not None:
            return self.ids_from_names(adapter_names)
        if adapter_ids is not None:
            return adapter_ids
        if self._batch_names is not None:  # fused_lora.adapter_names(model, names)
            if self._batch_ids is None:
                self._batch_ids = self.ids_from_names(self._batch_names, missing_as_base=True)
            return self._batch_ids
        if self._active_adapter is None:
            raise ValueError(
                "pass adapter_ids or adapter_names (or set active_adapter, or use fused_lora.adapter_names)"
            )
        index = -1 if self._active_adapter == BASE_ONLY else self.adapter_names.index(self._active_adapter)
        # On the CPU (free to check), or on x's GPU while a CUDA graph is captured.
        device = x.device if cannot_read_on_host(x) else "cpu"
        return torch.full(x.shape[:1] if x.dim() > 1 else (), index, dtype=torch.int32, device=device)

    def forward(
        self,
        x: torch.Tensor,
        adapter_ids: torch.Tensor | None = None,
        *,
        adapter_names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """x: (..., in) -> (..., out). Give at most one of adapter_ids (see
        multi_lora_linear) and adapter_names (one per batch entry, x.shape[0]);
        with neither, the rows use active_adapter (or adapter_names(model, ...))."""
        ids = self._row_ids(x, adapter_ids, adapter_names)
        names = self.adapter_names
        # A quantized base is decoded into x's dtype inside the kernels (merged: into a dense temporary).
        weight = self.weight if self._quant is None else self._quant.view(self, getattr(x, "dtype", None))
        if self.merged:
            self._check_merged_batch(ids)
            return F.linear(x, weight if self._quant is None else weight.dequantize(), self.bias)
        dropout = [self.lora_dropout[name] if self.training else 0.0 for name in names]
        return multi_lora_linear(
            x,
            weight,
            self.bias,
            [self.lora_A[name].weight for name in names],
            [self.lora_B[name].weight for name in names],
            self._scalings,
            ids,
            dropout_p=dropout,
        )

    def _check_merged_batch(self, ids: torch.Tensor) -> None:
        merged = self.adapter_names.index(self.merged_adapter)
        if cannot_read_on_host(ids):
            torch._assert_async((ids == merged).all(), "a batch names an adapter other than the merged one")
        elif not bool((ids == merged).all()):
            raise ValueError(
                f"adapter {self.merged_adapter!r} is merged into the weight: every row must use it "
                "(another adapter, or the base layer, needs unmerge() first)"
            )

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{name}: r={self.r[name]}, scaling={s:g}" for name, s in self.scaling.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"adapters={{{adapters}}}, merged={self.merged_adapter}"
            + (f", base={self.base_format}" if self._quant is not None else "")
        )
