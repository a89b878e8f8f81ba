"""DoRA (weight-decomposed LoRA): dora_weight_norm against torch.linalg.norm,
and dora_linear's y and the gradients of x, bias, A, B and the magnitude
against the float64 reference (with the norm a constant of the backward) on
both backends, every eligible forward candidate, both interpreter configs,
fp32 / bf16 / fp32 adapters, magnitudes with zeros, dropout (PEFT's form),
a quantized base; against PEFT's own DoRA layer; and that z is kept for the
magnitude's gradient only when the magnitude requires grad."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import assert_matches_reference, f64, lora_inputs, randn
from torch import nn

import fused_lora
from fused_lora.backends import tuning
from fused_lora.backends.candidates import Call, eligible
from fused_lora.batch import Adapters
from fused_lora.functional import dora_linear, dora_weight_norm
from fused_lora.kernels.adapters import LaunchAdapters
from fused_lora.quantized import quantize_fp8, quantize_nf4

SCALING = 1.5
# (x / W dtype, adapter and magnitude dtype)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
DTYPE_IDS = ["fp32", "bf16", "bf16-fp32A"]


def dora_reference(x, weight, bias, lora_a, lora_b, scaling, magnitude, factors=None):
    """DoRA in float64 (differentiable; the norm n_j = ||W_j + s B_j A|| detached):
    y = (m / n) (x W^T + s (x A^T) B^T) + bias, or with dropout factors (the
    mask / (1 - p)) PEFT's y = x W^T + bias + (m/n - 1) d W^T + (m/n) s (d A^T) B^T,
    d = x * factors."""
    norm = torch.linalg.norm(weight + scaling * lora_b @ lora_a, dim=1).detach()
    scale = magnitude / norm
    if factors is None:
        y = scale * (x @ weight.t() + scaling * (x @ lora_a.t()) @ lora_b.t())
    else:
        d = x * factors
        y = x @ weight.t() + (scale - 1) * (d @ weight.t()) + scale * (scaling * (d @ lora_a.t()) @ lora_b.t())
    return y if bias is None else y + bias


def make_magnitude(weight, lora_a, lora_b, zeros=False):
    """m (N,) in the adapters' dtype: the norm of W + s B A times a random
    factor in [0.5, 1.5] (a trained magnitude near its initial value), every
    third entry 0 when `zeros`."""
    dense = weight.dequantize() if hasattr(weight, "dequantize") else weight
    norm = torch.linalg.norm(f64(dense) + SCALING * f64(lora_b) @ f64(lora_a), dim=1)
    magnitude = norm * (0.5 + torch.rand(norm.shape, dtype=torch.float64))
    if zeros:
        magnitude[::3] = 0
    return magnitude.to(DEVICE, lora_a.dtype)


def check_dora(inputs, magnitude, weight=None, dropout_p=0.0):
    """dora_linear against dora_reference: y and the gradients of x, bias, A,
    B and the magnitude. weight: a QuantizedWeight to use as the base (the
    reference decodes it), else inputs' dense W. With dropout the mask is
    rebuilt by seeding torch's generator as dora_linear's F.dropout finds it."""
    names = ["x", "bias", "lora_a", "lora_b", "magnitude"]
    values = {**inputs, "magnitude": magnitude}
    ours = {n: values[n].detach().clone().requires_grad_() for n in names if values[n] is not None}
    ref = {n: f64(t).requires_grad_() for n, t in ours.items()}
    base = inputs["weight"] if weight is None else weight
    torch.manual_seed(2024)
    y = dora_linear(ours["x"], base, ours.get("bias"), ours["lora_a"], ours["lora_b"], SCALING, ours["magnitude"],
                    dropout_p=dropout_p)  # fmt: skip
    factors = None
    if dropout_p:
        torch.manual_seed(2024)
        kept = F.dropout(torch.ones_like(inputs["x"]), dropout_p) != 0
        factors = f64(kept) / (1 - dropout_p)
        assert 0 < kept.float().mean() < 1
    dense = f64(inputs["weight"] if weight is None else weight.dequantize())
    ref_y = dora_reference(ref["x"], dense, ref.get("bias"), ref["lora_a"], ref["lora_b"], SCALING, ref["magnitude"],
                           factors)  # fmt: skip
    dtype = inputs["x"].dtype
    assert y.dtype == dtype
    assert_matches_reference(y, ref_y, dtype, name="y")
    dy = randn(*y.shape, dtype=dtype, device=DEVICE)
    y.backward(dy)
    ref_y.backward(f64(dy))
    for name, t in ours.items():
        # The magnitude's gradient sums dY * z, z in x's dtype (as PEFT's base result is): x's gate.
        gate = dtype if name == "magnitude" else t.dtype
        assert_matches_reference(t.grad, ref[name].grad, gate, "gradients", name=f"d{name}")


# ---- the norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_weight_norm(dtype):
    """dora_weight_norm (from the skinny products W A^T and A A^T) equals the
    row norms of W + s B A, fp32 (fp64 for fp64) accurate; a cached
    ||W_j||^2 gives the same; detached."""
    inputs = lora_inputs(1, 100, 37, 5, dtype, device=DEVICE)
    weight, lora_a, lora_b = inputs["weight"], inputs["lora_a"].requires_grad_(), inputs["lora_b"]
    expected = torch.linalg.norm(f64(weight) + SCALING * f64(lora_b) @ f64(lora_a), dim=1)
    norm = dora_weight_norm(weight, lora_a, lora_b, SCALING)
    assert norm.shape == (37,) and not norm.requires_grad
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    gate = torch.float64 if dtype == torch.float64 else torch.float32
    assert_matches_reference(norm, expected, gate, name="norm")
    cached = f64(weight).square().sum(1).to(norm.dtype).to(DEVICE)
    assert_matches_reference(dora_weight_norm(weight, lora_a, lora_b, SCALING, cached), expected, gate, name="norm")


@pytest.mark.parametrize("quantize", [quantize_nf4, quantize_fp8], ids=["nf4", "fp8"])
def test_weight_norm_of_quantized_base(quantize):
    """A quantized base: the norms of its decoded W + s B A."""
    inputs = lora_inputs(1, 100, 37, 5, torch.bfloat16, torch.float32, device=DEVICE)
    q = quantize(inputs["weight"])
    expected = torch.linalg.norm(f64(q.dequantize()) + SCALING * f64(inputs["lora_b"]) @ f64(inputs["lora_a"]), dim=1)
    assert_matches_reference(dora_weight_norm(q, inputs["lora_a"], inputs["lora_b"], SCALING), expected,
                             torch.float32, name="norm")  # fmt: skip


# ---- dora_linear


@pytest.mark.parametrize("candidate", ["fused", "prepass", "composed"])
def test_every_forward_candidate(candidate, config, monkeypatch):
    """Each forward candidate (forced, and checked to have run) applies the
    column scale in its epilogue and keeps z for the magnitude's gradient."""
    chosen = []

    def choose(kind, *args):
        chosen.append((kind, name := real_choose(kind, *args)))
        return name

    real_choose = tuning.choose
    monkeypatch.setattr(tuning, "choose", choose)
    inputs = lora_inputs(21, 37, 48, 5, torch.float32, device=DEVICE)
    with fused_lora.set_backend("triton"), tuning.use(forward=candidate):
        check_dora(inputs, make_magnitude(inputs["weight"], inputs["lora_a"], inputs["lora_b"], zeros=True))
    assert ("forward", candidate) in chosen


def test_split_k_is_not_eligible():
    """Split-K has no column-scale epilogue: never a candidate with DoRA, even
    for a decode batch where it is one without; forcing it falls back to an
    eligible candidate with the right result."""
    inputs = lora_inputs(5, 37, 48, 5, torch.float32, device=DEVICE)
    adapters = Adapters([inputs["lora_a"]], [inputs["lora_b"]], torch.tensor([SCALING], device=DEVICE), [0.0])
    launch = LaunchAdapters(*adapters, multi=False)
    column_scale = torch.rand(48, device=DEVICE)
    plain = Call(inputs["x"], inputs["weight"], None, adapters, launch, None, 0, "ieee", "ieee")
    dora = dataclasses.replace(plain, column_scale=column_scale)
    assert "splitk" in eligible("forward", plain, 5)
    assert "splitk" not in eligible("forward", dora, 5)
    assert {"fused", "prepass", "composed"} <= set(eligible("forward", dora, 5))
    with fused_lora.set_backend("triton"), tuning.use(forward="splitk"):
        check_dora(inputs, make_magnitude(inputs["weight"], inputs["lora_a"], inputs["lora_b"]))


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("zeros", [False, True], ids=["m", "m-with-zeros"])
def test_dora_linear(dtype, adapter_dtype, bias, zeros, backend):
    """y and every gradient, with and without bias, with magnitudes of which
    some are 0 (those columns are the bias alone, and their magnitude's
    gradient is still sum_i dY_ij z_ij / n_j)."""
    inputs = lora_inputs(33, 100, 37, 6, dtype, adapter_dtype, device=DEVICE, bias=bias)
    check_dora(inputs, make_magnitude(inputs["weight"], inputs["lora_a"], inputs["lora_b"], zeros))


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPES, ids=DTYPE_IDS)
def test_dropout(dtype, adapter_dtype, backend):
    """With dropout, PEFT's form from torch's dropout and the fused op on d."""
    inputs = lora_inputs(33, 48, 37, 4, dtype, adapter_dtype, device=DEVICE)
    check_dora(inputs, make_magnitude(inputs["weight"], inputs["lora_a"], inputs["lora_b"]), dropout_p=0.3)


@pytest.mark.parametrize("quantize", [quantize_nf4, quantize_fp8], ids=["nf4", "fp8"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["p0", "dropout"])
def test_quantized_base(quantize, dropout_p, backend):
    """A QuantizedWeight base, decoded in the kernels' K loop (and by
    dequantize() on the dropout path)."""
    inputs = lora_inputs(21, 100, 37, 3, torch.bfloat16, device=DEVICE)
    q = quantize(inputs["weight"])
    check_dora(inputs, make_magnitude(q, inputs["lora_a"], inputs["lora_b"]), weight=q, dropout_p=dropout_p)


def test_magnitude_errors():
    """A magnitude of the wrong shape or not a float tensor raises, naming it."""
    inputs = lora_inputs(3, 16, 8, 2, torch.float32, device=DEVICE)
    args = [inputs[n] for n in ("x", "weight", "bias", "lora_a", "lora_b")]
    for bad in (torch.ones(7, device=DEVICE), torch.ones(8, dtype=torch.int64, device=DEVICE)):
        with pytest.raises(ValueError, match="magnitude"):
            dora_linear(*args, SCALING, bad)
    with pytest.raises(TypeError, match="magnitude"):
        dora_linear(*args, SCALING, [1.0] * 8)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["m-trained", "m-frozen"])
def test_z_is_kept_only_for_the_magnitude(requires_grad, backend):
    """z (M, N) is saved for the backward exactly when the magnitude requires
    grad; the other gradients need only x, W, the adapters and H."""
    m, k, n = 9, 20, 13
    inputs = lora_inputs(m, k, n, 3, torch.float32, device=DEVICE)
    leaves = [inputs[name].requires_grad_() for name in ("x", "lora_a", "lora_b")]
    magnitude = make_magnitude(inputs["weight"], inputs["lora_a"], inputs["lora_b"]).requires_grad_(requires_grad)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = dora_linear(leaves[0], inputs["weight"], inputs["bias"], *leaves[1:], SCALING, magnitude)
    assert ((m, n) in saved) == requires_grad, saved
    y.square().sum().backward()
    assert all(t.grad is not None for t in leaves)
    assert (magnitude.grad is not None) == requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_matches_peft(dtype, training, backend):
    """PEFT's own DoRA layer (peft.tuners.lora.Linear, use_dora=True) with our
    A, B and magnitude: the same y and gradients of x, A, B and the magnitude
    (within the gate of the dtype, PEFT in the same dtype)."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import Linear as PeftLinear

    k, n, r, alpha = 48, 37, 4, 6
    base = nn.Linear(k, n, dtype=dtype, device=DEVICE)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, use_dora=True, init_lora_weights=False)
    layer = PeftLinear(base, "default", config=config, r=r, lora_alpha=alpha).train(training)
    scaling = layer.scaling["default"]
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        lora_a.copy_(randn(r, k, scale=k**-0.5, dtype=dtype))
        lora_b.copy_(randn(n, r, scale=r**-0.5, dtype=dtype))
        magnitude.copy_(magnitude * (0.5 + torch.rand(n, device=DEVICE)))
    assert lora_a.dtype == lora_b.dtype == magnitude.dtype == dtype
    x = randn(2, 11, k, dtype=dtype, device=DEVICE)
    dy = randn(2, 11, n, dtype=dtype, device=DEVICE)

    def run(fn):
        for p in (lora_a, lora_b, magnitude):
            p.grad = None
        leaf = x.clone().requires_grad_()
        y = fn(leaf)
        y.backward(dy)
        return [y, leaf.grad, lora_a.grad, lora_b.grad, magnitude.grad]

    theirs = run(layer)
    ours = run(lambda t: dora_linear(t, base.weight, base.bias, lora_a, lora_b, scaling, magnitude))
    for name, got, want in zip(["y", "dx", "dA", "dB", "dmagnitude"], ours, theirs, strict=True):
        assert_matches_reference(got, want, dtype, "forward" if name == "y" else "gradients", name=name)
