"""LoRALinear: a drop-in for nn.Linear with a fused LoRA update."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .functional import check_dropout, lora_linear


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear(nn.Module):
    """y = x W^T + b + scaling * (x A^T) B^T, with W and b frozen.

    Parameters, named as in PEFT: `weight` (out, in) and `bias` (out,) frozen;
    `lora_A.weight` (r, in) and `lora_B.weight` (out, r) trainable.
    scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).
    lora_dropout: in training mode, dropout with this p on the LoRA branch's
    input, fused into the kernels (the backward regenerates the mask from a
    seed drawn per call); none in eval mode.

    init_lora_weights: True (default) = A kaiming-uniform, B zero, so the
    layer starts equal to the base layer; "gaussian" = A normal(0, 1/r), B
    zero; "pissa" (PiSSA, as PEFT) = A and B from the top-r singular triplets
    of W, so that scaling * B A is W's best rank-r part, and W replaced in
    place by the residual W - scaling * B A (the output is unchanged, but the
    base weight, possibly shared, changes); "pissa_niter_<n>" = the same from
    torch.svd_lowrank with n subspace iterations (faster, randomised); False =
    both left with nn.Linear's random init (a non-zero update, for tests).
    lora_dtype: the adapters' dtype (default: the layer's);
    float32 adapters on a bf16 / fp16 layer compute the LoRA branch in fp32.
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
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # The base layer exactly as nn.Linear builds it, then frozen.
        base = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight = base.weight
        self.bias = base.bias
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_dtype: torch.dtype | None = None,
    ) -> "LoRALinear":
        """Wrap an existing nn.Linear. The new layer shares (does not copy)
        its weight and bias Parameters and freezes them; merge() changes that
        shared weight in place, as PEFT does."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features = linear.in_features
        layer.out_features = linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_dtype)
        return layer

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_dtype):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        check_dropout(lora_dropout, None)
        if init_lora_weights not in (True, False, "gaussian", "pissa") and not (
            isinstance(init_lora_weights, str)
            and init_lora_weights.startswith("pissa_niter_")
            and init_lora_weights.removeprefix("pissa_niter_").isdecimal()
        ):
            raise ValueError(
                "init_lora_weights must be True, False, 'gaussian', 'pissa' or 'pissa_niter_<n>', "
                f"got {init_lora_weights!r}"
            )
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        kwargs = dict(bias=False, device=self.weight.device, dtype=lora_dtype or self.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kwargs)
        self.lora_B = nn.Linear(r, self.out_features, **kwargs)
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """Initialise A and B as PEFT does (see the class docstring). "pissa"
        also rewrites the weight in place (the residual)."""
        # Remembered for adapter configs: a PiSSA adapter only fits PiSSA's residual weight.
        self.init_lora_weights = init_lora_weights
        if init_lora_weights is False:
            return
        if isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa"):
            if self.r > min(self.in_features, self.out_features):
                raise ValueError(f"init_lora_weights={init_lora_weights!r} needs r <= min(in, out), got r={self.r}")
            # The SVD runs in fp32 (fp64 stays fp64) whatever W's dtype; W is rounded once, at the end.
            w = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
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
            self.weight.copy_(w - (self.scaling * lora_b) @ lora_a)
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def get_delta_weight(self) -> torch.Tensor:
        """scaling * B A: (out, in), in float32."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling * B A, in place on the (possibly shared) weight,
        computed in float32 and rounded once. The original W is kept (a copy)
        so that unmerge() restores it bit for bit."""
        if self.merged:
            return
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.copy_(self.weight.float() + self.get_delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight saved by merge(), exactly."""
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # the update is already in W
            return F.linear(x, self.weight, self.bias)
        dropout_p = self.lora_dropout if self.training else 0.0  # eval mode has no dropout
        return lora_linear(
            x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling, dropout_p=dropout_p
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"
        )
