"""lora_linear end to end, on both backends and through autograd: the output
and every gradient against float64 autograd of the reference (grad sets,
dtype pairs, shapes, strided inputs, float64, gradcheck), what the backward
saves, the scaling as a float or a tensor, meta tensors, backend dispatch
(and that a forward's backend is its backward's), the input checks (raised
before any kernel runs), fp32 precision / TF32 and the Triton rank limit."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, interpreted_only, requires_cuda
from helpers import DTYPE_PAIRS, PAIR_IDS, assert_matches_reference, f64, lora_inputs, randn

import fused_lora
from fused_lora import backends
from fused_lora.backends import torch_backend, triton_backend
from fused_lora.kernels import configs
from fused_lora.kernels.common import INTERPRETED
from fused_lora.reference import lora_linear_reference

NAMES = ("x", "weight", "bias", "lora_a", "lora_b")
# Which inputs require grad: LoRA training with and without dX, a frozen
# layer's input gradient only, one adapter matrix alone, and everything.
GRAD_SETS = {
    "x+A+B": {"x", "lora_a", "lora_b"},
    "A+B": {"lora_a", "lora_b"},
    "x": {"x"},
    "A": {"lora_a"},
    "B": {"lora_b"},
    "W+bias": {"weight", "bias"},
    "all": set(NAMES),
}


def leaf(t, requires_grad):
    """A leaf copy of t with t's strides: a non-contiguous t stays a strided
    view (clone() would make it contiguous), in a NaN-filled buffer, so a
    read of a gap or past either end shows up."""
    if t.is_contiguous():
        return t.detach().clone().requires_grad_(requires_grad)
    pad = 3
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    buffer = torch.full((span + 2 * pad,), math.nan, dtype=t.dtype, device=t.device)
    view = buffer.as_strided(t.shape, t.stride(), pad).copy_(t.detach())
    assert view.stride() == t.stride()
    return view.requires_grad_(requires_grad)


def reference_on_device(x, weight, bias, lora_a, lora_b, scaling):
    """lora_linear_reference's formula where its float64 inputs are (a GPU's
    float64 GEMMs for shapes the CPU would take minutes over)."""
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_a), lora_b)


def check_layer(inputs, requires_grad, scaling=1.5, x_view=None, ref_device="cpu"):
    """Run lora_linear and the float64 reference on the same inputs and the
    same upstream gradient; compare y and every requested gradient (the
    others must stay None)."""
    reference = lora_linear_reference if ref_device == "cpu" else reference_on_device
    dtype, adapter_dtype = inputs["x"].dtype, inputs["lora_a"].dtype
    view = x_view or (lambda t: t)
    ours = {n: None if t is None else leaf(t, n in requires_grad) for n, t in inputs.items()}
    ref = {
        n: None if t is None else t.detach().to(ref_device, torch.float64).requires_grad_(n in requires_grad)
        for n, t in inputs.items()
    }
    y = fused_lora.lora_linear(view(ours["x"]), *(ours[n] for n in NAMES[1:]), scaling)
    ref_y = reference(view(ref["x"]), *(ref[n] for n in NAMES[1:]), scaling)
    assert y.dtype == dtype and y.device.type == DEVICE
    assert y.requires_grad == bool(requires_grad)
    assert_matches_reference(y, ref_y, dtype, name="y")
    if not requires_grad:
        return
    dy = randn(*y.shape, dtype=dtype, device=DEVICE)
    y.backward(dy)
    ref_y.backward(dy.to(ref_device, torch.float64))  # the same, rounded, upstream gradient
    for name in NAMES:
        if ours[name] is None:
            continue
        grad = ours[name].grad
        if name not in requires_grad:
            assert grad is None, f"d{name} was not requested"
            continue
        assert grad.dtype == ours[name].dtype and grad.device == ours[name].device
        grad_dtype = adapter_dtype if name.startswith("lora") else dtype
        assert_matches_reference(grad, ref[name].grad, grad_dtype, "gradients", name=f"d{name}")


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("grads", GRAD_SETS, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradients_match_reference(backend, dtype, adapter_dtype, grads, bias):
    inputs = lora_inputs(33, 100, 70, 5, dtype, adapter_dtype, device=DEVICE, bias=bias)
    check_layer(inputs, GRAD_SETS[grads])


def test_inference_without_gradients(backend):
    """No input requires grad: the bare implementation (no autograd node)."""
    inputs = lora_inputs(7, 48, 16, 4, torch.float32, device=DEVICE)
    check_layer(inputs, set())
    with torch.no_grad():
        check_layer(inputs, set())


# (leading dims of x, K, N, r): no rows, one row, 3-D x, a zero leading dim
# inside, and shapes that no tile divides.
SHAPES = [
    ((0,), 48, 16, 4),
    ((1,), 16, 33, 1),
    ((), 20, 12, 3),
    ((2, 3, 7), 48, 100, 16),
    ((4, 0, 5), 16, 16, 2),
    ((130,), 257, 48, 33),
    ((5,), 0, 12, 2),  # K = 0: y = bias, H = 0
    ((5,), 16, 0, 2),  # N = 0: an empty y, dX = 0
]


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize(("lead", "k", "n", "r"), SHAPES, ids=str)
def test_shapes(backend, lead, k, n, r, dtype, adapter_dtype):
    inputs = lora_inputs(1, k, n, r, dtype, adapter_dtype, device=DEVICE)
    inputs["x"] = randn(*lead, k, dtype=dtype, device=DEVICE)
    check_layer(inputs, GRAD_SETS["all"])


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
def test_non_contiguous_x_and_weight(backend, dtype, adapter_dtype):
    """x as a transposed view (a (3, 7, K) tensor from (7, 3, K)), W as a
    slice of a larger matrix, A and B as transposed / sliced views."""
    inputs = lora_inputs(21, 48, 33, 4, dtype, adapter_dtype, device=DEVICE)
    inputs["x"] = randn(7, 3, 48, dtype=dtype, device=DEVICE)
    inputs["weight"] = randn(40, 60, scale=48**-0.5, dtype=dtype, device=DEVICE)[2:35, 5:53]
    inputs["lora_a"] = randn(48, 4, scale=48**-0.5, dtype=adapter_dtype, device=DEVICE).t()
    inputs["lora_b"] = randn(33, 9, scale=0.5, dtype=adapter_dtype, device=DEVICE)[:, 3:7]
    assert not any(inputs[n].is_contiguous() for n in ("weight", "lora_a", "lora_b"))
    check_layer(inputs, GRAD_SETS["all"], x_view=lambda x: x.transpose(0, 1))


@pytest.mark.parametrize(("m", "k", "n", "r"), [(4, 8, 6, 2), (33, 100, 70, 5)], ids=str)
def test_non_contiguous_bias(backend, m, k, n, r):
    """A bias read with stride 2 (every other element of a longer vector):
    the kernels must follow its stride, not assume it is contiguous."""
    inputs = lora_inputs(m, k, n, r, torch.float32, device=DEVICE)
    inputs["bias"] = randn(2 * n, dtype=torch.float32, device=DEVICE)[::2]
    assert not inputs["bias"].is_contiguous()
    check_layer(inputs, GRAD_SETS["all"], scaling=1.0)


def test_non_contiguous_bias_as_reported(backend):
    x, weight, bias = torch.randn(4, 8, device=DEVICE), torch.randn(6, 8, device=DEVICE), torch.randn(12, device=DEVICE)
    lora_a, lora_b, bias = torch.randn(2, 8, device=DEVICE), torch.randn(6, 2, device=DEVICE), bias[::2]
    y = fused_lora.lora_linear(x, weight, bias, lora_a, lora_b, 1.0)
    assert_matches_reference(y, lora_linear_reference(x, weight, bias, lora_a, lora_b, 1.0), torch.float32)


def test_broadcast_x_and_bias(backend):
    """Stride-0 views (x and bias expanded from one row / one value): read
    through their strides, and their gradients summed back by autograd."""
    inputs = lora_inputs(1, 16, 12, 2, torch.float32, device=DEVICE)
    inputs["bias"] = randn(1, device=DEVICE)
    dy = randn(9, 12, device=DEVICE)
    results = []
    for function, to in ((fused_lora.lora_linear, torch.clone), (lora_linear_reference, f64)):
        x_row, bias_value, lora_a = (to(inputs[n]).requires_grad_() for n in ("x", "bias", "lora_a"))
        y = function(
            x_row.expand(9, 16), to(inputs["weight"]), bias_value.expand(12), lora_a, to(inputs["lora_b"]), 0.5
        )
        y.backward(dy.to(y))
        results.append((y, x_row.grad, bias_value.grad, lora_a.grad))
    for name, got, want in zip(("y", "dx", "dbias", "dA"), *results, strict=True):
        assert_matches_reference(got, want, torch.float32, "forward" if name == "y" else "gradients", name=name)


@interpreted_only
def test_multi_tile_small_config():
    """16^3 tiles: every loop of the kernels runs several times, every edge
    mask bites and the dA / dB reductions split over M."""
    with fused_lora.set_backend("triton"), configs.use_interpreter_config("small"):
        inputs = lora_inputs(70, 37, 33, 5, torch.float32, device=DEVICE)
        inputs["bias"] = randn(66, dtype=torch.float32, device=DEVICE)[::2]
        check_layer(inputs, GRAD_SETS["all"])


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("r", [1, 4, 5, 16, 33, 64, 128, 256])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 16, 16), (7, 257, 100), (130, 100, 257)], ids=str)
def test_sweep(backend, m, k, n, r, dtype, adapter_dtype):
    inputs = lora_inputs(m, k, n, r, dtype, adapter_dtype, device=DEVICE)
    check_layer(inputs, GRAD_SETS["all"])


def test_float64(backend):
    inputs = lora_inputs(9, 20, 12, 3, torch.float64, device=DEVICE)
    if backend == "triton" and not INTERPRETED:  # compiled Triton has no float64 dot: an error, not a wrong result
        with pytest.raises(TypeError, match="float64 runs on the torch backend only"):
            fused_lora.lora_linear(*inputs.values(), 1.0)
        return
    check_layer(inputs, GRAD_SETS["all"])


def _gradcheck_inputs(m, k, n, r):
    inputs = lora_inputs(m, k, n, r, torch.float64, device="cpu")
    return tuple(t.requires_grad_() for t in inputs.values())


def test_gradcheck_torch_backend():
    with fused_lora.set_backend("torch"):
        assert torch.autograd.gradcheck(lambda *t: fused_lora.lora_linear(*t, 0.8), _gradcheck_inputs(6, 10, 8, 3))


def test_gradcheck_torch_backend_with_dropout():
    """A fixed seed makes dropout a fixed linear map: gradcheck applies."""
    with fused_lora.set_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda *t: fused_lora.lora_linear(*t, 0.8, dropout_p=0.4, seed=5), _gradcheck_inputs(6, 10, 8, 3)
        )


@pytest.mark.skipif(not INTERPRETED, reason="float64 Triton kernels run only interpreted")
def test_gradcheck_triton_interpreted():
    # fast_mode: a full gradcheck interprets hundreds of launches
    with fused_lora.set_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda *t: fused_lora.lora_linear(*t, 0.8, dropout_p=0.3, seed=9),
            _gradcheck_inputs(5, 7, 6, 3),
            fast_mode=True,
        )


# ---- what the backward keeps ------------------------------------------------

M, K, N, R = 64, 32, 48, 4
SCALING_SHAPE = (1,)
# Activations saved per grad set (shapes with M rows): x only for dA or dW, H
# (M, r) only for dB, never anything M x N. Besides them only parameters: W,
# the adapters (possibly as transposed views) and the (1,) scaling. (The torch
# backend's one-adapter path, recorded by torch's autograd, keeps fewer.)
SAVED = {
    "A+B": [(M, K), (M, R)],
    "A": [(M, K)],
    "B": [(M, R)],
    "x": [],
    "W+bias": [(M, K)],
    "x+A+B": [(M, K), (M, R)],
}


@pytest.mark.parametrize("grads", SAVED, ids=str)
def test_only_needed_tensors_are_saved(backend, grads):
    inputs = lora_inputs(M, K, N, R, torch.float32, device=DEVICE)
    for name in GRAD_SETS[grads]:
        inputs[name].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = fused_lora.lora_linear(*inputs.values(), 1.0)
    activations = [shape for shape in saved if shape and shape[0] == M]
    assert sorted(activations) == sorted(SAVED[grads])
    parameters = {(N, K), (K, N), (R, K), (K, R), (N, R), (R, N), SCALING_SHAPE}  # or transposed views
    assert set(saved) - set(activations) <= parameters, saved
    y.sum().backward()  # and the backward runs from what was saved


def test_dropout_saves_the_seed_not_the_mask(backend):
    inputs = lora_inputs(M, K, N, R, torch.float32, device=DEVICE)
    inputs["lora_a"].requires_grad_()
    inputs["lora_b"].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=0.2)
    assert sorted(saved) == sorted([(M, K), (N, K), (M, R), (), SCALING_SHAPE, (R, K), (N, R)])


# ---- scaling: a float or a one-element tensor ----------------------------------


@pytest.mark.parametrize("scaling", [math.nan, math.inf, -math.inf], ids=str)
def test_non_finite_scaling_raises(scaling):
    inputs = lora_inputs(3, 8, 6, 2, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match=r"^scaling must be finite"):
        fused_lora.lora_linear(*inputs.values(), scaling)


@pytest.mark.parametrize("shape", [(), (1,)], ids=str)
def test_scaling_as_a_tensor(backend, shape):
    """A float tensor of one element on x's device: the same y and gradients
    as the float (the value is data, read by the kernels)."""
    inputs = lora_inputs(33, 48, 40, 5, torch.float32, device=DEVICE)
    scaling = torch.full(shape, 0.75, device=DEVICE)
    check_layer(inputs, GRAD_SETS["all"], scaling=scaling)
    as_float = fused_lora.lora_linear(*inputs.values(), 0.75)
    torch.testing.assert_close(fused_lora.lora_linear(*inputs.values(), scaling), as_float, rtol=0, atol=0)


def test_scaling_tensor_of_fp32_adapters_on_bf16_x(backend):
    inputs = lora_inputs(17, 48, 40, 4, torch.bfloat16, torch.float32, device=DEVICE)
    check_layer(inputs, GRAD_SETS["x+A+B"], scaling=torch.tensor([1.25], device=DEVICE))


@pytest.mark.parametrize(
    ("scaling", "error", "message"),
    [
        (torch.ones(2), ValueError, r"scaling must have shape \(\) or \(1,\), got \(2,\)"),
        (torch.ones(1, 1), ValueError, r"scaling must have shape \(\) or \(1,\), got \(1, 1\)"),
        (torch.ones(1, dtype=torch.int64), TypeError, "scaling must be a float tensor"),
        (torch.ones(1, device="meta"), ValueError, "scaling must be on x's device"),
    ],
    ids=["two elements", "2-d", "integer", "other device"],
)
def test_bad_scaling_tensor(scaling, error, message):
    inputs = lora_inputs(3, 8, 6, 2, torch.float32, device=DEVICE)
    if scaling.device.type != "meta":
        scaling = scaling.to(DEVICE)
    with pytest.raises(error, match=message):
        fused_lora.lora_linear(*inputs.values(), scaling)


# ---- meta tensors -------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
def test_meta_inputs_give_a_meta_result(backend, dtype, adapter_dtype):
    """As nn.Linear on meta tensors: shape and dtype, no data, and a backward
    whose gradients are meta tensors of the inputs' shapes and dtypes."""
    inputs = lora_inputs(1, 8, 6, 2, dtype, adapter_dtype, device=DEVICE)
    inputs["x"] = torch.empty(2, 3, 8, dtype=dtype)
    meta = {n: t.to("meta").requires_grad_() for n, t in inputs.items()}
    y = fused_lora.lora_linear(*meta.values(), 0.5, dropout_p=0.1)
    assert y.device.type == "meta" and y.shape == (2, 3, 6) and y.dtype == dtype
    y.sum().backward()
    for name, t in meta.items():
        assert t.grad.device.type == "meta" and t.grad.shape == t.shape and t.grad.dtype == t.dtype, name
    with torch.no_grad():
        y = fused_lora.lora_linear(*(t.detach() for t in meta.values()), 0.5)
    assert y.device.type == "meta" and y.shape == (2, 3, 6) and y.dtype == dtype


@pytest.mark.parametrize("name", NAMES[1:])
def test_mixed_meta_and_cpu_devices_raise(name):
    inputs = lora_inputs(3, 8, 6, 2, torch.float32, device="cpu")
    inputs[name] = inputs[name].to("meta")
    with pytest.raises(ValueError, match=f"^{name} must be on x's device cpu, got meta"):
        fused_lora.lora_linear(*inputs.values(), 1.0)


def test_meta_x_with_cpu_weight_raises():
    inputs = lora_inputs(3, 8, 6, 2, torch.float32, device="cpu")
    inputs["x"] = inputs["x"].to("meta")
    with pytest.raises(ValueError, match=r"^weight must be on x's device meta, got cpu"):
        fused_lora.lora_linear(*inputs.values(), 1.0)


# ---- dispatch ---------------------------------------------------------------


@pytest.fixture
def no_backend_choice(monkeypatch):
    """Neither the environment nor set_backend chooses the backend."""
    monkeypatch.delenv("FUSED_LORA_BACKEND", raising=False)
    fused_lora.set_backend(None)
    yield
    fused_lora.set_backend(None)


AUTO = triton_backend if (DEVICE == "cuda" or INTERPRETED) else torch_backend


def test_auto_dispatch(no_backend_choice):
    x = torch.randn(2, 3, device=DEVICE)
    assert backends.requested() == "auto"
    assert backends.select(x) is AUTO
    assert backends.select(x, "auto") is AUTO
    with fused_lora.set_backend("auto"):
        assert backends.select(x) is AUTO


def test_set_backend_as_context_and_call(no_backend_choice):
    x = torch.randn(2, 3, device=DEVICE)
    with fused_lora.set_backend("torch"):
        assert backends.select(x) is torch_backend
        with fused_lora.set_backend("auto"):  # nested: the inner block wins, then the outer is back
            assert backends.select(x) is AUTO
        assert backends.select(x) is torch_backend
    assert backends.select(x) is AUTO
    fused_lora.set_backend("torch")
    assert backends.select(x) is torch_backend and backends.requested() == "torch"
    fused_lora.set_backend(None)
    assert backends.select(x) is AUTO


def test_the_chosen_backend_runs(no_backend_choice, monkeypatch):
    """set_backend decides which module's forward runs, not only what
    select() returns."""
    inputs = lora_inputs(5, 16, 12, 2, torch.float32, device=DEVICE)
    calls = []
    for module in (torch_backend, triton_backend):
        original = module.forward
        monkeypatch.setattr(module, "forward", lambda *a, _o=original, _m=module, **k: calls.append(_m) or _o(*a, **k))
    for name, expected in (("torch", torch_backend), ("triton", triton_backend), ("auto", AUTO)):
        if expected is triton_backend and AUTO is torch_backend:
            continue  # the Triton backend cannot run on this machine (its own test below)
        calls.clear()
        with fused_lora.set_backend(name):
            fused_lora.lora_linear(*inputs.values(), 1.0)
        assert calls == [expected], name


def test_backend_from_environment(no_backend_choice, monkeypatch):
    x = torch.randn(2, 3, device=DEVICE)
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")
    assert backends.select(x) is torch_backend
    with fused_lora.set_backend("auto"):  # a set_backend call wins over the environment
        assert backends.select(x) is AUTO
    monkeypatch.setenv("FUSED_LORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FUSED_LORA_BACKEND must be one of"):
        backends.select(x)
    with pytest.raises(ValueError, match="FUSED_LORA_BACKEND must be one of"):
        fused_lora.lora_linear(*lora_inputs(2, 8, 4, 2, torch.float32, device=DEVICE).values(), 1.0)


@pytest.mark.parametrize("name", ["cublas", "Torch", ""])
def test_unknown_backend_name(no_backend_choice, name):
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_lora.set_backend(name)
    assert backends.requested() == "auto", "a rejected name changes nothing"


def test_forced_triton_on_cpu_without_interpreter(no_backend_choice, monkeypatch):
    """The Triton backend on CPU tensors without TRITON_INTERPRET=1: an
    error, not a silent fallback to torch."""
    monkeypatch.setattr(backends, "INTERPRETED", False)
    inputs = lora_inputs(2, 8, 4, 2, torch.float32, device="cpu")
    with fused_lora.set_backend("triton"):
        with pytest.raises(RuntimeError, match="the triton backend needs CUDA tensors"):
            backends.select(inputs["x"])
        with pytest.raises(RuntimeError, match="the triton backend needs CUDA tensors"):
            fused_lora.lora_linear(*inputs.values(), 1.0)
    assert backends.select(inputs["x"]) is torch_backend, "auto falls back to torch on CPU"


@requires_cuda
def test_float64_on_the_gpu_needs_the_torch_backend():
    inputs = lora_inputs(4, 8, 6, 2, torch.float64, device=DEVICE)
    with fused_lora.set_backend("triton"), pytest.raises(TypeError, match="float64 runs on the torch backend only"):
        fused_lora.lora_linear(*inputs.values(), 1.0)


def _dropout_grads(inputs, forward_backend, backward_backend, seed=21):
    """y and the gradients of a dropout forward run under one backend and
    its backward called under another."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    with fused_lora.set_backend(forward_backend):
        y = fused_lora.lora_linear(*leaves.values(), 0.5, dropout_p=0.5, seed=seed)
    dy = torch.ones_like(y)
    if backward_backend is None:
        y.backward(dy)
    else:
        with fused_lora.set_backend(backward_backend):
            y.backward(dy)
    return [y] + [t.grad for t in leaves.values()]


@pytest.mark.skipif(AUTO is torch_backend, reason="the Triton backend cannot run here")
@pytest.mark.parametrize(("forward_backend", "other"), [("torch", "triton"), ("triton", "torch")])
def test_backward_runs_on_the_forward_backend(no_backend_choice, forward_backend, other):
    """Each backend draws its own dropout mask: a backward that switched
    backend would apply another mask. The forward under set_backend, its
    backward outside the block (or under the other backend) must give the
    gradients of a run entirely on the forward's backend."""
    inputs = lora_inputs(24, 40, 20, 4, torch.float32, device=DEVICE)
    alone = _dropout_grads(inputs, forward_backend, forward_backend)
    elsewhere = _dropout_grads(inputs, other, other)
    # the test can fail: the two backends' masks give different gradients
    assert not torch.allclose(alone[1], elsewhere[1], atol=1e-3), "dx of the two backends should differ"
    for backward_backend in (None, other):
        mixed = _dropout_grads(inputs, forward_backend, backward_backend)
        for name, got, want in zip(("y", *NAMES), mixed, alone, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # and the forward backend's mask is the one dropout_mask gives for it
    with fused_lora.set_backend(forward_backend):
        mask = fused_lora.dropout_mask((24, 40), 0.5, 21, DEVICE).cpu()
    ref = {n: t.detach().to("cpu", torch.float64).requires_grad_() for n, t in inputs.items()}
    d = ref["x"] * mask / (1 - 0.5)  # the LoRA branch's input
    ref_y = F.linear(ref["x"], ref["weight"], ref["bias"]) + 0.5 * F.linear(F.linear(d, ref["lora_a"]), ref["lora_b"])
    ref_y.backward(torch.ones_like(ref_y))
    assert_matches_reference(mixed[0], ref_y, torch.float32, name="y")
    for name, got in zip(NAMES, mixed[1:], strict=True):
        assert_matches_reference(got, ref[name].grad, torch.float32, "gradients", name=f"d{name}")


# ---- bad inputs: one test per error, raised before any kernel runs ----------


def good(**changes):
    args = lora_inputs(3, 8, 6, 2, torch.float32, device=DEVICE)
    args["scaling"] = 2.0
    args.update(changes)
    return args


BAD_INPUTS = {
    "x not a tensor": (dict(x=[[1.0] * 8]), TypeError, "x must be a torch.Tensor"),
    "weight not a tensor": (dict(weight=None), TypeError, "weight must be a torch.Tensor"),
    "bias not a tensor": (dict(bias=1.0), TypeError, "bias must be a torch.Tensor"),
    "lora_a not a tensor": (dict(lora_a=[[1.0] * 8] * 2), TypeError, "lora_a must be a torch.Tensor"),
    "lora_b not a tensor": (dict(lora_b=None), TypeError, "lora_b must be a torch.Tensor"),
    "scaling a bool": (dict(scaling=True), TypeError, "scaling must be a Python float"),
    "scaling a str": (dict(scaling="2.0"), TypeError, "scaling must be a Python float"),
    "scaling None": (dict(scaling=None), TypeError, "scaling must be a Python float"),
    "scaling NaN": (dict(scaling=math.nan), ValueError, "scaling must be finite, got nan"),
    "scaling inf": (dict(scaling=math.inf), ValueError, "scaling must be finite, got inf"),
    "scaling tensor of two": (dict(scaling=torch.ones(2)), ValueError, r"scaling must have shape \(\) or \(1,\)"),
    "scaling integer tensor": (dict(scaling=torch.ones((), dtype=torch.int32)), TypeError, "scaling must be a float"),
    "scaling on another device": (
        dict(scaling=torch.ones(1, device="meta")),
        ValueError,
        "scaling must be on x's device",
    ),
    "0-d x": (dict(x=torch.tensor(1.0)), ValueError, "x must have at least 1 dimension"),
    "wrong K": (dict(x=torch.randn(3, 9)), ValueError, r"x must have shape \(\.\.\., 8\)"),
    "1-d weight": (dict(weight=torch.randn(8)), ValueError, "weight must be 2-D"),
    "3-d weight": (dict(weight=torch.randn(6, 8, 1)), ValueError, "weight must be 2-D"),
    "1-d lora_a": (dict(lora_a=torch.randn(8)), ValueError, "lora_a must be 2-D"),
    "1-d lora_b": (dict(lora_b=torch.randn(6)), ValueError, "lora_b must be 2-D"),
    "r = 0": (dict(lora_a=torch.randn(0, 8), lora_b=torch.randn(6, 0)), ValueError, "lora_a must have rank r >= 1"),
    "lora_a wrong K": (dict(lora_a=torch.randn(2, 7)), ValueError, r"lora_a must have shape \(r, 8\)"),
    "rank mismatch": (dict(lora_b=torch.randn(6, 3)), ValueError, r"lora_b must have shape \(6, 2\)"),
    "lora_b wrong N": (dict(lora_b=torch.randn(5, 2)), ValueError, r"lora_b must have shape \(6, 2\)"),
    "bias wrong N": (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
    "2-d bias": (dict(bias=torch.randn(1, 6)), ValueError, "bias must be 1-D"),
    "integer x": (dict(x=torch.ones(3, 8, dtype=torch.int32)), TypeError, "x must be float16, bfloat16"),
    "complex x": (dict(x=torch.ones(3, 8, dtype=torch.complex64)), TypeError, "x must be float16, bfloat16"),
    "weight dtype": (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, "weight must have x's dtype"),
    "bias dtype": (dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, "bias must have x's dtype"),
    "lora_b dtype": (dict(lora_b=torch.randn(6, 2, dtype=torch.float64)), TypeError, "lora_b must have lora_a's"),
    "fp16 adapters on fp32 x": (
        dict(lora_a=torch.randn(2, 8, dtype=torch.float16), lora_b=torch.randn(6, 2, dtype=torch.float16)),
        TypeError,
        "lora_a and lora_b must have x's dtype",
    ),
    "weight on another device": (dict(weight=torch.randn(6, 8, device="meta")), ValueError, "weight must be on x's"),
    "bias on another device": (dict(bias=torch.randn(6, device="meta")), ValueError, "bias must be on x's device"),
    "lora_b on another device": (dict(lora_b=torch.randn(6, 2, device="meta")), ValueError, "lora_b must be on x's"),
    "dropout_p 1": (dict(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    "dropout_p negative": (dict(dropout_p=-0.1), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    "dropout_p a list": (dict(dropout_p=[0.1]), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    "seed negative": (dict(dropout_p=0.1, seed=-1), ValueError, "seed must be None or an int"),
    "seed 2**31": (dict(dropout_p=0.1, seed=2**31), ValueError, "seed must be None or an int"),
    "seed a float": (dict(dropout_p=0.1, seed=1.0), ValueError, "seed must be None or an int"),
    "seed a bool": (dict(seed=True), ValueError, "seed must be None or an int"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_input(case, monkeypatch):
    changes, error, message = BAD_INPUTS[case]
    args = good(
        **{
            k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
            for k, v in changes.items()
        }
    )

    def no_kernel(*_, **__):
        raise AssertionError("a kernel ran before the input check")

    for module in (torch_backend, triton_backend):
        monkeypatch.setattr(module, "forward", no_kernel)
    with pytest.raises(error, match=f"^{message}"):
        fused_lora.lora_linear(**args)


def test_bad_input_check_runs_before_kernels_with_gradients(monkeypatch):
    """The same with inputs that require grad (the autograd route)."""

    def no_kernel(*_, **__):
        raise AssertionError("a kernel ran before the input check")

    for module in (torch_backend, triton_backend):
        monkeypatch.setattr(module, "forward", no_kernel)
    args = good(lora_b=torch.randn(6, 3, device=DEVICE, requires_grad=True))
    args["x"].requires_grad_()
    with pytest.raises(ValueError, match=r"lora_b must have shape \(6, 2\)"):
        fused_lora.lora_linear(**args)


# ---- fp32 precision, TF32 and the rank limit ---------------------------------


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
    matmul_precision.allow_tf32 = True  # the legacy flag
    assert triton_backend.fp32_precision() == "tf32"
    matmul_precision.allow_tf32 = False
    assert triton_backend.fp32_precision() == "ieee"


def test_kernels_run_ieee_fp32_as_3xtf32_on_a_gpu(matmul_precision, monkeypatch):
    """On a GPU the kernels' fp32 dots are TF32 when torch allows it, else
    3xTF32 (fp32 accuracy on tensor cores); 16-bit operands have no choice,
    and the interpreter computes fp32 exactly ("ieee")."""
    assert triton_backend.kernel_precision(torch.float32) == "ieee"  # the interpreter
    monkeypatch.setattr(triton_backend, "INTERPRETED", False)
    matmul_precision.fp32_precision = "ieee"
    assert triton_backend.kernel_precision(torch.float32) == "tf32x3"
    assert triton_backend.kernel_precision(torch.bfloat16) == "ieee"
    matmul_precision.fp32_precision = "tf32"
    assert triton_backend.kernel_precision(torch.float32) == "tf32"


@requires_cuda
def test_tf32_within_its_tolerance_and_ieee_tighter(matmul_precision):
    inputs = lora_inputs(512, 1024, 768, 16, torch.float32, device=DEVICE)
    ref = lora_linear_reference(*inputs.values(), 0.5)
    with fused_lora.set_backend("triton"):
        matmul_precision.fp32_precision = "tf32"
        tf32 = fused_lora.lora_linear(*inputs.values(), 0.5)
        matmul_precision.fp32_precision = "ieee"
        ieee = fused_lora.lora_linear(*inputs.values(), 0.5)
    assert_matches_reference(tf32, ref, "tf32")
    assert_matches_reference(ieee, ref, torch.float32)
    assert (ieee.double().cpu() - ref).abs().max() < (tf32.double().cpu() - ref).abs().max()


@requires_cuda
def test_tf32_gradients_within_their_tolerance(matmul_precision):
    matmul_precision.fp32_precision = "tf32"
    inputs = lora_inputs(256, 512, 384, 16, torch.float32, device=DEVICE)
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    ref = {n: t.double().cpu().requires_grad_() for n, t in inputs.items()}
    with fused_lora.set_backend("triton"):
        y = fused_lora.lora_linear(*leaves.values(), 0.5)
        dy = torch.randn_like(y)
        y.backward(dy)
    ref_y = lora_linear_reference(*ref.values(), 0.5)
    ref_y.backward(dy.double().cpu())
    for name in ("x", "lora_a", "lora_b"):  # dW and dbias are plain torch
        assert_matches_reference(leaves[name].grad, ref[name].grad, "tf32", "gradients", name=f"d{name}")


@requires_cuda
@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize(("m", "r"), [(4096, 16), (4099, 64), (16, 16), (1, 128)], ids=str)
def test_large_shapes_on_gpu(m, r, dtype, adapter_dtype):
    inputs = lora_inputs(m, 4096, 4096, r, dtype, adapter_dtype, device=DEVICE)
    with fused_lora.set_backend("triton"):
        check_layer(inputs, GRAD_SETS["x+A+B"], ref_device=DEVICE)


@pytest.mark.skipif(AUTO is torch_backend, reason="the Triton backend cannot run here")
def test_rank_above_kernel_limit_on_triton():
    inputs = lora_inputs(2, 8, 4, 257, torch.float32, device=DEVICE)
    with fused_lora.set_backend("triton"), pytest.raises(ValueError, match="the Triton kernels take r <= 256"):
        fused_lora.lora_linear(*inputs.values(), 1.0)


def test_rank_above_kernel_limit_on_torch():
    inputs = lora_inputs(5, 8, 4, 257, torch.float32, device=DEVICE)
    with fused_lora.set_backend("torch"):
        check_layer(inputs, GRAD_SETS["x+A+B"])


def test_rank_256_on_both(backend):
    check_layer(lora_inputs(9, 40, 24, 256, torch.float32, device=DEVICE), GRAD_SETS["all"])
