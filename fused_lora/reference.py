"""The float64 references and the baselines the benchmark compares.

x: (..., K)   W: (N, K)   bias: (N,)   A: (r, K)   B: (N, r)   s: float
many adapters: lora_a[a]: (r_a, K), lora_b[a]: (N, r_a), adapter_ids: x's
leading shape or its first dimension, -1 = base only
"""

import torch
import torch.nn.functional as F

# The accuracy gate, the one table tests and the benchmark both apply:
#     |out - ref| <= tol * max|ref| + tol * |ref|   against a float64 reference.
# fp32 rows are for the interpreter, the torch backend, and a GPU with IEEE
# fp32 matmuls (the default); TF32 gets its own row.
TOLERANCES = {
    # dtype: (forward, gradients)
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    "tf32": (1e-2, 2e-2),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 3e-2),
}


def within_tolerance(out, ref, dtype, kind="forward"):
    """(ok, worst error / allowed) for out against a float64 reference, by
    the gate above."""
    tol = TOLERANCES[dtype][0 if kind == "forward" else 1]
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if ref.numel() == 0:
        return True, 0.0
    err = (out - ref).abs()
    bound = tol * ref.abs().max() + tol * ref.abs()
    ratio = (err / bound).max().item() if bound.min() > 0 else float(err.max() > 0)
    return bool(torch.isfinite(out).all() and (err <= bound).all()), ratio


def tolerance_check(out, ref, dtype, kind="forward") -> tuple[bool, str]:
    """within_tolerance, with a message that says where and by how much it
    fails (the tests' assertion)."""
    ok, _ = within_tolerance(out, ref, dtype, kind)
    if ok:
        return True, ""
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(out).all():
        return False, "non-finite values (an unwritten or out-of-bounds element)"
    tol = TOLERANCES[dtype][0 if kind == "forward" else 1]
    err = (out - ref).abs()
    bound = tol * ref.abs().max() + tol * ref.abs()
    worst = (err - bound).argmax()
    return False, (
        f"({dtype}, {kind}) error {err.flatten()[worst]:.3g} at flat index {worst} exceeds "
        f"{bound.flatten()[worst]:.3g} (max|ref| {ref.abs().max():.3g})"
    )


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling):
    """x W^T + bias + s (x A^T) B^T, every input upcast to float64 on the CPU.
    Differentiable: tests take the reference gradients by autograd."""

    def f64(t):
        return None if t is None else t.to(device="cpu", dtype=torch.float64)

    x, weight, bias, lora_a, lora_b = map(f64, (x, weight, bias, lora_a, lora_b))
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_a), lora_b)


def naive(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0):
    """PEFT's path: three GEMMs, an M x N temporary, the adapters' dtype for
    the LoRA branch (x cast to it, then nn.Dropout's), the sum cast back to
    x's dtype."""
    result = F.linear(x, weight, bias)
    dropped = F.dropout(x.to(lora_a.dtype), dropout_p) if dropout_p > 0 else x.to(lora_a.dtype)
    update = F.linear(F.linear(dropped, lora_a), lora_b) * scaling
    return (result + update).to(x.dtype)


def composed(x, weight, bias, lora_a, lora_b, scaling):
    """Unsloth's path: y = addmm(bias, x, W^T), then y.addmm_(x A^T, B^T, alpha=s)
    in place (adapters in x's dtype)."""
    x2d = x.reshape(-1, x.shape[-1])
    y = torch.mm(x2d, weight.t()) if bias is None else torch.addmm(bias, x2d, weight.t())
    y.addmm_(torch.mm(x2d, lora_a.t()), lora_b.t(), alpha=scaling)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def merged_weight(weight, lora_a, lora_b, scaling):
    """W' = W + s B A, in float32, rounded once to W's dtype."""
    return (weight.float() + scaling * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def merged(x, merged_w, bias):
    """One GEMM with a precomputed merged weight: the speed of light."""
    return F.linear(x, merged_w, bias)


def peft_mixed_batch(x, weight, bias, lora_a, lora_b, scalings, adapter_ids):
    """PEFT's `LoraLayer._mixed_batch_forward`: the base layer on every row,
    then for each adapter in the batch (found on the host) its rows gathered,
    two GEMMs in the adapter's dtype, the result added back in x's dtype.
    Launches and time grow with the number of adapters."""
    k = x.shape[-1]
    if adapter_ids.dim() != 1:  # one id per row of a 1-D or N-D x: index rows
        result_shape = (*x.shape[:-1], weight.shape[0])
        x, adapter_ids = x.reshape(-1, k), adapter_ids.reshape(-1)
    else:
        result_shape = None
    result = F.linear(x, weight, bias)
    ids = adapter_ids.tolist()
    for adapter in sorted(set(ids) - {-1}):
        rows = [i for i, a in enumerate(ids) if a == adapter]
        sub_batch = x[rows].to(lora_a[adapter].dtype)
        update = F.linear(F.linear(sub_batch, lora_a[adapter]), lora_b[adapter]) * scalings[adapter]
        result[rows] += update.to(result.dtype)
    return result if result_shape is None else result.reshape(result_shape)


def multi_lora_reference(x, weight, bias, lora_a, lora_b, scalings, adapter_ids):
    """The per-adapter loop with every input upcast to float64 on the CPU.
    Differentiable: tests take the reference gradients by autograd."""

    def f64(t):
        return None if t is None else t.to(device="cpu", dtype=torch.float64)

    return peft_mixed_batch(
        f64(x), f64(weight), f64(bias), [f64(a) for a in lora_a], [f64(b) for b in lora_b], scalings, adapter_ids.cpu()
    )
