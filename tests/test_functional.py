"""lora_linear end to end, on both backends: forward and every gradient
against float64 autograd of the reference, gradcheck, input checks, dispatch."""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_matches_reference, lora_inputs
from test_forward import DTYPE_PAIRS, PAIR_IDS

import fused_lora
from fused_lora import dispatch, torch_backend, triton_backend
from fused_lora.kernels.common import INTERPRETED
from fused_lora.reference import lora_linear_reference

NAMES = ("x", "weight", "bias", "lora_a", "lora_b")
# Which inputs require grad: LoRA training with and without dX, a frozen
# layer's input gradient only, one adapter alone, and everything.
GRAD_SETS = {
    "x+A+B": {"x", "lora_a", "lora_b"},
    "A+B": {"lora_a", "lora_b"},
    "x": {"x"},
    "A": {"lora_a"},
    "B": {"lora_b"},
    "all": set(NAMES),
}


def check_layer(inputs, dtype, adapter_dtype, requires_grad, scaling=1.5, x_view=None):
    """Run lora_linear and the float64 reference with the same inputs and
    the same upstream gradient; compare y and every requested gradient."""
    leaves = {n: None if t is None else t.clone().requires_grad_(n in requires_grad) for n, t in inputs.items()}
    ref_leaves = {
        n: None if t is None else t.detach().double().cpu().requires_grad_(n in requires_grad)
        for n, t in inputs.items()
    }
    x = leaves["x"] if x_view is None else x_view(leaves["x"])
    y = fused_lora.lora_linear(x, leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], scaling)
    ref_x = ref_leaves["x"] if x_view is None else x_view(ref_leaves["x"])
    ref = lora_linear_reference(
        ref_x, ref_leaves["weight"], ref_leaves["bias"], ref_leaves["lora_a"], ref_leaves["lora_b"], scaling
    )
    assert y.dtype == dtype and y.device.type == DEVICE
    assert_matches_reference(y, ref, dtype, name="y")
    if not requires_grad:
        return
    dy = torch.randn(y.shape, dtype=torch.float64).to(y.device, y.dtype)
    y.backward(dy)
    ref.backward(dy.double().cpu())  # the same, rounded, upstream gradient
    for name in NAMES:
        if leaves[name] is None:
            continue
        if name in requires_grad:
            grad_dtype = adapter_dtype if name.startswith("lora") else dtype
            assert leaves[name].grad.dtype == leaves[name].dtype
            assert_matches_reference(leaves[name].grad, ref_leaves[name].grad, grad_dtype, "gradients", name=f"d{name}")
        else:
            assert leaves[name].grad is None


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("grads", GRAD_SETS, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradients_match_reference(backend, dtype, adapter_dtype, grads, bias):
    inputs = lora_inputs(33, 100, 70, 5, dtype, adapter_dtype, device=DEVICE, bias=bias)
    check_layer(inputs, dtype, adapter_dtype, GRAD_SETS[grads])


# (leading dims of x, K, N, r)
SHAPES = [((0,), 48, 16, 4), ((1,), 16, 33, 1), ((2, 3, 7), 48, 100, 16), ((4, 0, 5), 16, 16, 2), ((130,), 257, 48, 33)]


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize(("lead", "k", "n", "r"), SHAPES, ids=str)
def test_shapes(backend, lead, k, n, r, dtype, adapter_dtype):
    inputs = lora_inputs(1, k, n, r, dtype, adapter_dtype, device=DEVICE)
    inputs["x"] = torch.randn(*lead, k, dtype=torch.float64).to(DEVICE, dtype)
    check_layer(inputs, dtype, adapter_dtype, GRAD_SETS["x+A+B"])


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS[:3] + DTYPE_PAIRS[3:4], ids=PAIR_IDS[:4])
def test_non_contiguous_x(backend, dtype, adapter_dtype):
    """x as a transposed view (a (3, 7, K) tensor from (7, 3, K)) and W as a
    slice of a larger matrix."""
    inputs = lora_inputs(21, 48, 33, 4, dtype, adapter_dtype, device=DEVICE)
    inputs["x"] = torch.randn(7, 3, 48, dtype=torch.float64).to(DEVICE, dtype)
    big_w = torch.randn(40, 60, dtype=torch.float64).to(DEVICE, dtype) * 48**-0.5
    inputs["weight"] = big_w[2:35, 5:53]
    check_layer(inputs, dtype, adapter_dtype, GRAD_SETS["all"], x_view=lambda x: x.transpose(0, 1))


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("r", [1, 3, 16, 33, 64, 128, 256])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 16, 16), (7, 257, 100), (130, 100, 257)], ids=str)
def test_sweep(backend, m, k, n, r, dtype, adapter_dtype):
    inputs = lora_inputs(m, k, n, r, dtype, adapter_dtype, device=DEVICE)
    check_layer(inputs, dtype, adapter_dtype, GRAD_SETS["all"])


def test_float64(backend):
    if backend == "triton" and not INTERPRETED:
        pytest.skip("float64 runs on the torch backend only on a GPU")
    inputs = lora_inputs(9, 20, 12, 3, torch.float64, device=DEVICE)
    check_layer(inputs, torch.float64, torch.float64, GRAD_SETS["all"])


def _gradcheck_inputs(m, k, n, r):
    inputs = lora_inputs(m, k, n, r, torch.float64, device="cpu")
    return tuple(t.requires_grad_() for t in inputs.values())


def test_gradcheck_torch_backend():
    with fused_lora.set_backend("torch"):
        assert torch.autograd.gradcheck(lambda *t: fused_lora.lora_linear(*t, 0.8), _gradcheck_inputs(6, 10, 8, 3))


@pytest.mark.skipif(not INTERPRETED, reason="float64 Triton kernels run only interpreted")
def test_gradcheck_triton_interpreted():
    # fast_mode: a full gradcheck interprets hundreds of launches (TESTING.md)
    with fused_lora.set_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda *t: fused_lora.lora_linear(*t, 0.8), _gradcheck_inputs(5, 7, 6, 3), fast_mode=True
        )


def test_only_needed_tensors_are_saved():
    """Training A and B only: x and H are saved, nothing M x N."""
    inputs = lora_inputs(64, 32, 48, 4, torch.float32, device=DEVICE)
    inputs["lora_a"].requires_grad_()
    inputs["lora_b"].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        fused_lora.lora_linear(*inputs.values(), 1.0)
    assert sorted(saved) == sorted([(64, 32), (48, 32), (4, 32), (48, 4), (64, 4)])


# ---- dispatch ---------------------------------------------------------------


def test_auto_dispatch(monkeypatch):
    monkeypatch.delenv("FUSED_LORA_BACKEND", raising=False)
    x = torch.randn(2, 3, device=DEVICE)
    expected = triton_backend if (DEVICE == "cuda" or INTERPRETED) else torch_backend
    assert dispatch.select(x) is expected


def test_set_backend_as_context_and_call(monkeypatch):
    monkeypatch.delenv("FUSED_LORA_BACKEND", raising=False)
    x = torch.randn(2, 3, device=DEVICE)
    before = dispatch.select(x)
    with fused_lora.set_backend("torch"):
        assert dispatch.select(x) is torch_backend
    assert dispatch.select(x) is before
    try:
        fused_lora.set_backend("torch")
        assert dispatch.select(x) is torch_backend
    finally:
        fused_lora.set_backend(None)
    assert dispatch.select(x) is before


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")
    assert dispatch.select(torch.randn(2, 3, device=DEVICE)) is torch_backend
    monkeypatch.setenv("FUSED_LORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FUSED_LORA_BACKEND must be one of"):
        dispatch.select(torch.randn(2, 3))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_lora.set_backend("cublas")


@pytest.mark.skipif(INTERPRETED, reason="with TRITON_INTERPRET=1 the Triton backend runs on CPU")
def test_forced_triton_on_cpu_without_interpreter():
    with fused_lora.set_backend("triton"), pytest.raises(RuntimeError, match="needs CUDA tensors"):
        dispatch.select(torch.randn(2, 3))


# ---- bad inputs: one test per error, raised before any kernel runs ----------


def good(**changes):
    args = lora_inputs(3, 8, 6, 2, torch.float32, device=DEVICE)
    args["scaling"] = 2.0
    args.update(changes)
    return args


BAD_INPUTS = {
    "x not a tensor": (dict(x=[[1.0] * 8]), TypeError, "x must be a torch.Tensor"),
    "bias not a tensor": (dict(bias=1.0), TypeError, "bias must be a torch.Tensor"),
    "scaling a tensor": (dict(scaling=torch.tensor(2.0)), TypeError, "scaling must be a Python float"),
    "scaling a bool": (dict(scaling=True), TypeError, "scaling must be a Python float"),
    "0-d x": (dict(x=torch.tensor(1.0)), ValueError, "x must have at least 1 dimension"),
    "wrong K": (dict(x=torch.randn(3, 9)), ValueError, r"x must have shape \(\.\.\., 8\)"),
    "1-d weight": (dict(weight=torch.randn(8)), ValueError, "weight must be 2-D"),
    "3-d weight": (dict(weight=torch.randn(6, 8, 1)), ValueError, "weight must be 2-D"),
    "1-d lora_a": (dict(lora_a=torch.randn(8)), ValueError, "lora_a must be 2-D"),
    "r = 0": (dict(lora_a=torch.randn(0, 8), lora_b=torch.randn(6, 0)), ValueError, "rank r >= 1"),
    "lora_a wrong K": (dict(lora_a=torch.randn(2, 7)), ValueError, r"lora_a must have shape \(r, 8\)"),
    "rank mismatch": (dict(lora_b=torch.randn(6, 3)), ValueError, r"lora_b must have shape \(6, 2\)"),
    "lora_b wrong N": (dict(lora_b=torch.randn(5, 2)), ValueError, r"lora_b must have shape \(6, 2\)"),
    "bias wrong N": (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
    "2-d bias": (dict(bias=torch.randn(1, 6)), ValueError, "bias must be 1-D"),
    "integer x": (dict(x=torch.ones(3, 8, dtype=torch.int32)), TypeError, "x must be float16, bfloat16"),
    "weight dtype": (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, "weight must have x's dtype"),
    "bias dtype": (dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, "bias must have x's dtype"),
    "lora_b dtype": (dict(lora_b=torch.randn(6, 2, dtype=torch.float64)), TypeError, "lora_b must have lora_a's"),
    "fp16 adapters on fp32 x": (
        dict(lora_a=torch.randn(2, 8, dtype=torch.float16), lora_b=torch.randn(6, 2, dtype=torch.float16)),
        TypeError,
        "lora_a and lora_b must have x's dtype",
    ),
    "device mismatch": (dict(weight=torch.randn(6, 8, device="meta")), ValueError, "weight must be on x's device"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_input(case, monkeypatch):
    changes, error, message = BAD_INPUTS[case]
    args = good(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
                   for k, v in changes.items()})  # fmt: skip

    def no_kernel(*_, **__):
        raise AssertionError("a kernel ran before the input check")

    for backend in (torch_backend, triton_backend):
        monkeypatch.setattr(backend, "forward", no_kernel)
    with pytest.raises(error, match=message):
        fused_lora.lora_linear(**args)


# ---- fp32 precision and GPU-only checks -------------------------------------


@pytest.fixture
def matmul_precision():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    yield matmul
    matmul.fp32_precision = before


def test_fp32_precision_follows_torch(matmul_precision):
    matmul_precision.fp32_precision = "tf32"
    assert triton_backend.fp32_precision() == "tf32"
    matmul_precision.fp32_precision = "ieee"
    assert triton_backend.fp32_precision() == "ieee"


@pytest.mark.skipif(DEVICE != "cuda", reason="TF32 exists only on a GPU")
def test_tf32_within_its_tolerance_and_ieee_tighter(matmul_precision):
    inputs = lora_inputs(512, 1024, 768, 16, torch.float32, device=DEVICE)
    ref = lora_linear_reference(*inputs.values(), 0.5)
    matmul_precision.fp32_precision = "tf32"
    tf32 = fused_lora.lora_linear(*inputs.values(), 0.5)
    matmul_precision.fp32_precision = "ieee"
    ieee = fused_lora.lora_linear(*inputs.values(), 0.5)
    assert_matches_reference(tf32, ref, "tf32")
    assert_matches_reference(ieee, ref, torch.float32)
    assert (ieee.double().cpu() - ref).abs().max() < (tf32.double().cpu() - ref).abs().max()


@pytest.mark.skipif(DEVICE != "cuda", reason="large shapes need a GPU (the interpreter would take hours)")
@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize(("m", "r"), [(4096, 16), (4099, 64), (16, 16), (1, 128)], ids=str)
def test_large_shapes_on_gpu(m, r, dtype, adapter_dtype):
    inputs = lora_inputs(m, 4096, 4096, r, dtype, adapter_dtype, device=DEVICE)
    with fused_lora.set_backend("triton"):
        check_layer(inputs, dtype, adapter_dtype, GRAD_SETS["x+A+B"])


def test_rank_above_kernel_limit():
    inputs = lora_inputs(2, 8, 4, 257, torch.float32, device=DEVICE)
    with fused_lora.set_backend("triton"):
        if not (DEVICE == "cuda" or INTERPRETED):
            pytest.skip("the Triton backend cannot run here")
        with pytest.raises(ValueError, match="the Triton kernels take r <= 256"):
            fused_lora.lora_linear(*inputs.values(), 1.0)
    with fused_lora.set_backend("torch"):
        assert fused_lora.lora_linear(*inputs.values(), 1.0).shape == (2, 4)
