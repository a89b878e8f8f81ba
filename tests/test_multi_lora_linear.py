"""multi_lora_linear end to end, on both backends and through autograd: the
output and every gradient against the float64 per-adapter loop
(reference.multi_lora_reference) for dtype pairs, grad sets, shapes (1-D x,
ids per row or per batch entry, zero-size dims), assignments, many adapters,
strided inputs, float64 and gradcheck; per-adapter dropout against a
reference built from dropout_mask; adapters without rows (None gradients);
refilling the ids between forward and backward; scalings as floats or a
tensor; the caller's row order; and the input checks, raised before any
kernel runs."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, interpreted_only
from helpers import DTYPE_PAIRS, PAIR_IDS, assert_matches_reference, assign, lora_inputs, multi_inputs, randn

import fused_lora
from fused_lora import multi_lora_linear
from fused_lora.backends import torch_backend, triton_backend
from fused_lora.batch import UNSORTED_MAX_ROWS
from fused_lora.kernels import configs
from fused_lora.kernels.common import INTERPRETED
from fused_lora.reference import multi_lora_reference

BASE = ("x", "weight", "bias")
GRAD_SETS = {
    "x+A+B": {"x", "lora_a", "lora_b"},
    "A+B": {"lora_a", "lora_b"},
    "x": {"x"},
    "A": {"lora_a"},
    "B": {"lora_b"},
    "all": {*BASE, "lora_a", "lora_b"},
}
ARGS = ("weight", "bias", "lora_a", "lora_b", "scalings", "adapter_ids")


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
    return view.requires_grad_(requires_grad)


def leaves(inputs, requires_grad, to_f64=False):
    """Leaf copies of the tensors (float64 CPU ones for the reference);
    lora_a / lora_b are lists of leaves."""

    def copy(t, name):
        if to_f64:
            return t.detach().to("cpu", torch.float64).requires_grad_(name in requires_grad)
        return leaf(t, name in requires_grad)

    out = dict(inputs)
    for name in BASE:
        out[name] = None if inputs[name] is None else copy(inputs[name], name)
    for name in ("lora_a", "lora_b"):
        out[name] = [copy(t, name) for t in inputs[name]]
    return out


def per_row_ids(adapter_ids, lead):
    """adapter_ids of x's leading shape or its first dimension -> (M,)."""
    ids = adapter_ids.cpu()
    return ids.reshape((*ids.shape, *[1] * (len(lead) - ids.dim()))).expand(lead).reshape(-1)


def check_layer(inputs, requires_grad, x_view=None, reference=None, between=None, **kwargs):
    """Run multi_lora_linear and the float64 loop (or `reference`) on the
    same inputs and the same upstream gradient; compare y and every requested
    gradient. An adapter with no rows gets no gradient at all (None), as in
    PEFT; gradients not requested stay None. `between()` runs after the
    forwards, before the backwards."""
    dtype = inputs["x"].dtype
    adapter_dtype = inputs["lora_a"][0].dtype if inputs["lora_a"] else dtype
    ours, ref = leaves(inputs, requires_grad), leaves(inputs, requires_grad, to_f64=True)
    view = x_view or (lambda t: t)
    y = multi_lora_linear(view(ours["x"]), *(ours[n] for n in ARGS), **kwargs)
    ref_y = (reference or multi_lora_reference)(view(ref["x"]), *(ref[n] for n in ARGS))
    assert y.dtype == dtype and y.device.type == DEVICE
    assert_matches_reference(y, ref_y, dtype, name="y")
    used = set(per_row_ids(inputs["adapter_ids"], view(inputs["x"]).shape[:-1]).tolist())
    if between is not None:
        between()
    if not requires_grad:
        return y
    dy = randn(*y.shape, dtype=dtype, device=DEVICE)
    y.backward(dy)
    ref_y.backward(dy.to("cpu", torch.float64))
    for name in BASE:
        if ours[name] is not None:
            grad = ours[name].grad
            if name in requires_grad:
                assert grad.dtype == dtype
                assert_matches_reference(grad, ref[name].grad, dtype, "gradients", name=f"d{name}")
            else:
                assert grad is None, f"d{name} was not requested"
    for name in ("lora_a", "lora_b"):
        for a, (t, ref_t) in enumerate(zip(ours[name], ref[name], strict=True)):
            if name not in requires_grad or a not in used:
                assert t.grad is None, f"{name}[{a}] needs no gradient"
                continue
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
            assert_matches_reference(t.grad, ref_t.grad, adapter_dtype, "gradients", name=f"d{name}[{a}]")
    return y


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("grads", GRAD_SETS, ids=str)
def test_gradients_match_reference(backend, dtype, adapter_dtype, grads):
    inputs = multi_inputs(33, 100, 70, [5, 16, 1, 9], dtype, adapter_dtype, "uniform", device=DEVICE)
    check_layer(inputs, GRAD_SETS[grads])


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("m", [1, 7, UNSORTED_MAX_ROWS], ids=lambda m: f"M={m}")
def test_small_batches_are_not_sorted(backend, m, dtype, adapter_dtype):
    """Up to UNSORTED_MAX_ROWS rows the kernels take the rows unsorted."""
    inputs = multi_inputs(m, 48, 40, [4, 2, 8], dtype, adapter_dtype, device=DEVICE)
    check_layer(inputs, GRAD_SETS["all"])


def test_no_bias(backend):
    inputs = multi_inputs(20, 48, 33, [4, 8], torch.float32, bias=False, device=DEVICE)
    check_layer(inputs, GRAD_SETS["all"])


def test_inference_without_gradients(backend):
    inputs = multi_inputs(20, 48, 33, [4, 8], torch.bfloat16, torch.float32, device=DEVICE)
    assert not check_layer(inputs, set()).requires_grad
    with torch.no_grad():
        check_layer(inputs, set())


# (leading dims of x, K, N, ranks, assignment, ids per row or per batch entry)
SHAPES = [
    ((0,), 48, 16, [4, 2], "uniform", "row"),
    ((1,), 16, 33, [1], "one", "row"),
    ((), 20, 12, [3, 2], "one", "row"),  # a 1-D x: one row, a 0-d adapter_ids
    ((2, 3, 7), 48, 100, [16, 3], "uniform", "row"),
    ((5, 9), 48, 40, [2, 8, 4], "uniform", "row"),
    ((5, 9), 48, 40, [2, 8, 4], "uniform", "batch"),
    ((3, 4, 6), 16, 24, [5, 1], "uniform", "batch"),
    ((4, 0, 5), 16, 16, [2], "uniform", "batch"),
    ((0, 3), 16, 16, [2], "uniform", "batch"),
    ((70,), 37, 20, [1, 2, 3], "skewed", "row"),
    ((130,), 257, 48, [33, 4, 5], "uniform", "row"),
    ((20,), 0, 12, [2, 3], "uniform", "row"),  # K = 0
    ((20,), 16, 0, [2, 3], "uniform", "row"),  # N = 0
]


@pytest.mark.parametrize(("lead", "k", "n", "ranks", "assignment", "per"), SHAPES, ids=str)
def test_shapes(backend, lead, k, n, ranks, assignment, per):
    inputs = multi_inputs(1, k, n, ranks, torch.float32, assignment=assignment, device=DEVICE)
    inputs["x"] = randn(*lead, k, device=DEVICE)
    id_shape = lead if per == "row" else lead[:1]
    inputs["adapter_ids"] = assign(math.prod(id_shape), len(ranks), assignment).reshape(id_shape).to(DEVICE)
    check_layer(inputs, GRAD_SETS["all"])


@pytest.mark.parametrize("assignment", ["uniform", "skewed", "one", "base"])
def test_assignments(backend, assignment):
    """Every adapter and -1 alike; 80% on one adapter; all on one adapter
    (the others get no gradient); no adapter at all (y is the base layer)."""
    inputs = multi_inputs(40, 48, 33, [4, 8, 2, 16], torch.bfloat16, torch.float32, assignment, device=DEVICE)
    check_layer(inputs, GRAD_SETS["all"])


def test_no_adapters(backend):
    inputs = multi_inputs(9, 16, 12, [], torch.float32, device=DEVICE)
    check_layer(inputs, GRAD_SETS["all"])


@pytest.mark.parametrize("ids_dtype", [torch.int16, torch.int32, torch.int64], ids=str)
def test_adapter_ids_of_any_integer_dtype(backend, ids_dtype):
    inputs = multi_inputs(20, 16, 12, [2, 3, 4], torch.float32, device=DEVICE)
    inputs["adapter_ids"] = inputs["adapter_ids"].to(ids_dtype)
    check_layer(inputs, GRAD_SETS["x+A+B"])


@interpreted_only
@pytest.mark.parametrize("m", [12, 70])
def test_multi_tile_small_config(m):
    """16^3 tiles: many adapters per tile, several tiles per adapter, the
    dA / dB reductions split over rows."""
    with fused_lora.set_backend("triton"), configs.use_interpreter_config("small"):
        inputs = multi_inputs(m, 37, 33, [5, 1, 16, 17], torch.float32, device=DEVICE)
        check_layer(inputs, GRAD_SETS["all"])


@pytest.mark.slow
@pytest.mark.parametrize("assignment", ["uniform", "skewed"])
def test_64_adapters(backend, assignment):
    """64 adapters, ranks 1..64, 150 rows: most tiles hold many adapters."""
    inputs = multi_inputs(150, 40, 24, list(range(1, 65)), torch.float32, assignment=assignment, device=DEVICE)
    check_layer(inputs, GRAD_SETS["x+A+B"])


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("ranks", [[1, 4], [5, 16, 33], [64, 128, 256]], ids=str)
@pytest.mark.parametrize(("m", "k", "n"), [(7, 257, 100), (130, 100, 257)], ids=str)
def test_sweep(backend, m, k, n, ranks, dtype, adapter_dtype):
    inputs = multi_inputs(m, k, n, ranks, dtype, adapter_dtype, device=DEVICE)
    check_layer(inputs, GRAD_SETS["all"])


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
def test_non_contiguous_inputs(backend, dtype, adapter_dtype):
    """x as a transposed view, W, the bias and adapters as strided views
    (the kernels copy a non-contiguous adapter; x, W and the bias are read in
    place), the ids as a transposed view too."""
    inputs = multi_inputs(21, 48, 33, [4, 6], dtype, adapter_dtype, device=DEVICE)
    inputs["x"] = randn(7, 3, 48, dtype=dtype, device=DEVICE)
    inputs["adapter_ids"] = inputs["adapter_ids"].reshape(7, 3).t()
    inputs["weight"] = randn(40, 60, scale=48**-0.5, dtype=dtype, device=DEVICE)[2:35, 5:53]
    inputs["bias"] = randn(66, dtype=dtype, device=DEVICE)[::2]
    inputs["lora_a"][1] = randn(6, 50, scale=48**-0.5, dtype=adapter_dtype, device=DEVICE)[:, 1:49]
    inputs["lora_b"][0] = randn(4, 33, scale=0.5, dtype=adapter_dtype, device=DEVICE).t()
    check_layer(inputs, GRAD_SETS["all"], x_view=lambda x: x.transpose(0, 1))


def test_one_adapter_matches_lora_linear(backend):
    """Every row on one adapter: the same y and gradients as lora_linear."""
    inputs = lora_inputs(33, 48, 40, 5, torch.float32, device=DEVICE)
    ids = torch.zeros(33, dtype=torch.int64, device=DEVICE)
    results = []
    for call in (
        lambda t: fused_lora.lora_linear(*t, 0.7),
        lambda t: multi_lora_linear(*t[:3], [t[3]], [t[4]], [0.7], ids),
    ):
        ts = [v.clone().requires_grad_() for v in inputs.values()]
        y = call(ts)
        y.backward(torch.ones_like(y))
        results.append([y, *(t.grad for t in ts)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_row_order_is_the_callers(backend):
    """Permuting the rows of x and adapter_ids together permutes y and dX the
    same way: the internal grouping by adapter never shows."""
    inputs = multi_inputs(40, 32, 24, [4, 8, 2], torch.float32, device=DEVICE)
    args = [inputs[n] for n in ("weight", "bias", "lora_a", "lora_b", "scalings")]
    perm = torch.randperm(40, device=DEVICE)
    x = inputs["x"].clone().requires_grad_()
    y = multi_lora_linear(x, *args, inputs["adapter_ids"])
    y.backward(torch.arange(y.numel(), dtype=y.dtype, device=DEVICE).reshape(y.shape) / y.numel())
    x_perm = inputs["x"][perm].clone().requires_grad_()
    y_perm = multi_lora_linear(x_perm, *args, inputs["adapter_ids"][perm])
    y_perm.backward((torch.arange(y.numel(), dtype=y.dtype, device=DEVICE).reshape(y.shape) / y.numel())[perm])
    torch.testing.assert_close(y_perm, y[perm], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_perm.grad, x.grad[perm], rtol=1e-6, atol=1e-6)


def test_float64(backend):
    inputs = multi_inputs(17, 20, 12, [3, 1, 5], torch.float64, device=DEVICE)
    if backend == "triton" and not INTERPRETED:  # compiled Triton has no float64 dot: an error, not a wrong result
        with pytest.raises(TypeError, match="float64 runs on the torch backend only"):
            multi_lora_linear(*inputs.values())
        return
    check_layer(inputs, GRAD_SETS["all"])


def _gradcheck_inputs(dropout_p=0.0):
    inputs = multi_inputs(8, 10, 7, [3, 1], torch.float64, device="cpu")
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1])
    tensors = [inputs["x"], inputs["weight"], inputs["bias"], *inputs["lora_a"], *inputs["lora_b"]]
    for t in tensors:
        t.requires_grad_()

    def f(x, weight, bias, a0, a1, b0, b1):
        return multi_lora_linear(
            x, weight, bias, [a0, a1], [b0, b1], inputs["scalings"], ids, dropout_p=dropout_p, seed=17
        )

    return f, tuple(tensors)


def test_gradcheck_torch_backend():
    with fused_lora.set_backend("torch"):
        assert torch.autograd.gradcheck(*_gradcheck_inputs())
        assert torch.autograd.gradcheck(*_gradcheck_inputs(dropout_p=[0.5, 0.2]))


@pytest.mark.skipif(not INTERPRETED, reason="float64 Triton kernels run only interpreted")
def test_gradcheck_triton_interpreted():
    with fused_lora.set_backend("triton"):  # fast_mode: a full gradcheck interprets too many launches
        assert torch.autograd.gradcheck(*_gradcheck_inputs(), fast_mode=True)
        assert torch.autograd.gradcheck(*_gradcheck_inputs(dropout_p=[0.5, 0.2]), fast_mode=True)


def test_cpu_adapter_ids_with_device_x(backend):
    """adapter_ids may stay on the CPU (no device sync to check them)."""
    inputs = multi_inputs(24, 16, 8, [2, 3], torch.float32, device=DEVICE)
    inputs["adapter_ids"] = inputs["adapter_ids"].cpu()
    check_layer(inputs, GRAD_SETS["all"])


def test_deterministic_mode_is_bitwise_repeatable():
    """Under torch.use_deterministic_algorithms the dA / dB reductions that
    span several row chunks sum their pieces in a fixed order: two backwards
    give bitwise the same gradients, and the right ones."""
    m = 50 if INTERPRETED else 600  # several chunks of the reduction (split_m: 32 interpreted small, 256 on a GPU)
    dropout_p = [0.3, 0.0, 0.5]
    reference = dropout_reference(dropout_p, 12, (m,))
    inputs = multi_inputs(m, 20, 24, [5, 16, 3], torch.float32, device=DEVICE)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with fused_lora.set_backend("triton"), configs.use_interpreter_config("small"):
            runs = []
            for _ in range(2):
                ours = leaves(inputs, GRAD_SETS["all"])
                y = multi_lora_linear(ours["x"], *(ours[n] for n in ARGS), dropout_p=dropout_p, seed=12)
                y.backward(torch.ones_like(y))
                runs.append([*(t.grad for t in ours["lora_a"]), *(t.grad for t in ours["lora_b"])])
            check_layer(inputs, GRAD_SETS["all"], reference=reference, dropout_p=dropout_p, seed=12)
    finally:
        torch.use_deterministic_algorithms(before)
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@pytest.mark.skipif(DEVICE != "cuda" and not INTERPRETED, reason="the Triton backend cannot run here")
def test_rank_above_kernel_limit_on_triton():
    inputs = multi_inputs(6, 8, 4, [2, 257], torch.float32, device=DEVICE)
    with fused_lora.set_backend("triton"), pytest.raises(ValueError, match="the Triton kernels take r <= 256"):
        multi_lora_linear(*inputs.values())
    with fused_lora.set_backend("torch"):
        check_layer(inputs, GRAD_SETS["x+A+B"])


M, K, N = 40, 32, 48
# Saved per grad set besides W, the adapters, the (n,) scalings and the rows
# (ids, order, starts): x only for dA or dW, H (M, max r) only for dB; never
# anything M x N.
SAVED = {"A+B": [(M, K), (M, 8)], "x": [], "B": [(M, 8)], "all": [(M, K), (M, 8)]}


@pytest.mark.parametrize("grads", SAVED, ids=str)
def test_only_needed_tensors_are_saved(backend, grads):
    inputs = multi_inputs(M, K, N, [4, 8, 2], torch.float32, device=DEVICE)
    ours = leaves(inputs, GRAD_SETS[grads])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = multi_lora_linear(ours["x"], *(ours[n] for n in ARGS))
    always = [(N, K), (4, K), (8, K), (2, K), (N, 4), (N, 8), (N, 2), (3,), (M,), (M,), (4,)]
    assert sorted(saved) == sorted(always + SAVED[grads])
    y.sum().backward()


# ---- adapters without rows, and the ids buffer -----------------------------------


@pytest.mark.parametrize("ids_on", ["cpu", "device"])
def test_adapter_without_rows_gets_none(backend, ids_on):
    """Adapter 1 has no rows: None for its A and B (eager), correct gradients
    for the others, and those that have rows get a gradient even when it
    is tiny."""
    inputs = multi_inputs(30, 24, 20, [3, 4, 2, 5], torch.float32, device=DEVICE)
    ids = torch.tensor([0, 2, 3, -1, 0, 2] * 5)
    inputs["adapter_ids"] = ids if ids_on == "cpu" else ids.to(DEVICE)
    check_layer(inputs, GRAD_SETS["all"])
    ours = leaves(inputs, GRAD_SETS["all"])
    multi_lora_linear(ours["x"], *(ours[n] for n in ARGS)).sum().backward()
    assert [a.grad is None for a in ours["lora_a"]] == [False, True, False, False]
    assert [b.grad is None for b in ours["lora_b"]] == [False, True, False, False]


@pytest.mark.parametrize("m", [12, 40], ids=lambda m: f"M={m}")
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_refilling_the_ids_between_forward_and_backward(backend, m, ids_dtype, dropout):
    """A serving / training loop reuses one ids buffer: refilling it after
    the forward (adapter 1 had no rows, now adapter 2 has none) must not
    change the backward, which uses the forward's rows."""
    inputs = multi_inputs(m, 32, 24, [4, 2, 8], torch.float32, device=DEVICE)
    ids = torch.tensor([0, 2, -1, 2] * (m // 4), dtype=ids_dtype, device=DEVICE)
    other = torch.tensor([1, 1, 0, -1] * (m // 4), dtype=ids_dtype, device=DEVICE)
    inputs["adapter_ids"] = ids
    dropout_p = [0.3, 0.0, 0.5] if dropout else [0.0] * 3
    reference = dropout_reference(dropout_p, 5, (m,))
    check_layer(
        inputs, GRAD_SETS["all"], reference=reference, between=lambda: ids.copy_(other), dropout_p=dropout_p, seed=5
    )
    assert torch.equal(ids, other)


# ---- per-adapter dropout ---------------------------------------------------------


def dropout_reference(dropout_p, seed, lead_shape):
    """The float64 loop with each row's LoRA input d = x * mask / (1 - p_a):
    mask from dropout_mask for the row's adapter's p (each backend draws one
    uniform per element of x, kept where u >= p, so thresholding it per row
    is calling dropout_mask with each adapter's p)."""

    def reference(x, weight, bias, lora_a, lora_b, scalings, adapter_ids):
        k = x.shape[-1]
        ids = per_row_ids(adapter_ids, lead_shape)
        x2 = x.reshape(-1, k)
        y = F.linear(x2, weight, bias)
        for a, p in enumerate(dropout_p):
            rows = (ids == a).nonzero().squeeze(1)
            mask = fused_lora.dropout_mask(x2.shape, p, seed, DEVICE).cpu().reshape(-1, k)[rows]
            d = x2[rows] * mask / (1 - p)
            y = y.index_add(0, rows, scalings[a] * F.linear(F.linear(d, lora_a[a]), lora_b[a]))
        return y.reshape(*x.shape[:-1], weight.shape[0])

    return reference


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("m", [12, 40], ids=lambda m: f"M={m}")
def test_per_adapter_dropout_matches_reference(backend, m, dtype, adapter_dtype):
    """Different p per adapter, one of them 0: y, dX (masked G A) and dA
    (masked x) all use each row's adapter's mask."""
    dropout_p = [0.3, 0.0, 0.6, 0.1]
    inputs = multi_inputs(m, 40, 24, [4, 2, 8, 3], dtype, adapter_dtype, device=DEVICE)
    check_layer(
        inputs, GRAD_SETS["all"], reference=dropout_reference(dropout_p, 99, (m,)), dropout_p=dropout_p, seed=99
    )


def test_per_adapter_dropout_3d_x_and_ids_per_batch_entry(backend):
    """The mask is keyed on the row's logical index in x's flattened leading
    dims, whichever adapter the row has."""
    dropout_p = [0.5, 0.2]
    inputs = multi_inputs(1, 24, 20, [3, 5], torch.float32, device=DEVICE)
    inputs["x"] = randn(4, 6, 24, device=DEVICE)
    inputs["adapter_ids"] = torch.tensor([1, 0, -1, 1], device=DEVICE)
    check_layer(
        inputs, GRAD_SETS["all"], reference=dropout_reference(dropout_p, 3, (4, 6)), dropout_p=dropout_p, seed=3
    )


def test_per_adapter_dropout_differs_from_one_p(backend):
    """The test above can fail: p per adapter is not p[0] for every row."""
    inputs = multi_inputs(24, 32, 16, [4, 4], torch.float32, device=DEVICE)
    inputs["adapter_ids"] = torch.tensor([0, 1] * 12, device=DEVICE)
    per_adapter = multi_lora_linear(*inputs.values(), dropout_p=[0.2, 0.7], seed=1)
    same = multi_lora_linear(*inputs.values(), dropout_p=0.2, seed=1)
    torch.testing.assert_close(per_adapter[0::2], same[0::2], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(per_adapter[1::2], same[1::2], atol=1e-3)


@interpreted_only
def test_per_adapter_dropout_small_config():
    dropout_p = [0.4, 0.0, 0.25]
    with fused_lora.set_backend("triton"), configs.use_interpreter_config("small"):
        inputs = multi_inputs(50, 37, 20, [5, 3, 16], torch.float32, device=DEVICE)
        check_layer(
            inputs, GRAD_SETS["all"], reference=dropout_reference(dropout_p, 8, (50,)), dropout_p=dropout_p, seed=8
        )


# ---- scalings: floats or an (n,) tensor --------------------------------------------


@pytest.mark.parametrize("scalings_dtype", [torch.float32, torch.float64], ids=str)
def test_scalings_tensor_equals_floats(backend, scalings_dtype):
    inputs = multi_inputs(33, 32, 24, [4, 2, 8], torch.float32, device=DEVICE)
    results = []
    for scalings in (inputs["scalings"], torch.tensor(inputs["scalings"], dtype=scalings_dtype, device=DEVICE)):
        ours = leaves(inputs, GRAD_SETS["all"])
        y = multi_lora_linear(ours["x"], *(ours[n] for n in ARGS[:4]), scalings, inputs["adapter_ids"])
        y.backward(torch.ones_like(y))
        results.append([y, ours["x"].grad, *(t.grad for t in ours["lora_a"]), *(t.grad for t in ours["lora_b"])])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # and the tensor's values are used (not only its shape)
    check_layer({**inputs, "scalings": torch.tensor([0.1, -2.0, 3.0], device=DEVICE)}, GRAD_SETS["all"])


def test_scalings_tensor_non_contiguous(backend):
    """An (n,) view with stride 2 (every other value of a longer tensor):
    each adapter must get its own value, not its neighbour's in memory."""
    inputs = multi_inputs(33, 32, 24, [4, 2, 8], torch.float32, device=DEVICE)
    scalings = torch.tensor([0.5, 9.0, 0.75, 9.0, 1.5, 9.0], device=DEVICE)[::2]
    assert not scalings.is_contiguous()
    y = check_layer({**inputs, "scalings": scalings}, GRAD_SETS["all"])
    torch.testing.assert_close(y, multi_lora_linear(*{**inputs, "scalings": [0.5, 0.75, 1.5]}.values()))


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=str)
def test_non_finite_scaling_in_list_raises(value):
    inputs = multi_inputs(3, 8, 6, [2, 3], torch.float32, device=DEVICE)
    inputs["scalings"] = [1.0, value]
    with pytest.raises(ValueError, match=r"^scalings\[1\] must be finite"):
        multi_lora_linear(*inputs.values())


def test_meta_inputs_give_a_meta_result():
    inputs = multi_inputs(1, 8, 6, [2, 3], torch.bfloat16, torch.float32, device="meta")
    inputs["x"] = torch.empty(2, 5, 8, dtype=torch.bfloat16, device="meta")
    for ids in (torch.tensor([0, -1]), torch.zeros(2, dtype=torch.int64, device="meta")):
        y = multi_lora_linear(*{**inputs, "adapter_ids": ids}.values())
        assert y.device.type == "meta" and y.shape == (2, 5, 6) and y.dtype == torch.bfloat16


# ---- bad inputs: one test per error, raised before any kernel runs ----------


def good(**changes):
    args = multi_inputs(3, 8, 6, [2, 3], torch.float32)
    args.update(changes)
    return args


BAD_INPUTS = {
    "x not a tensor": (dict(x=[[1.0] * 8]), TypeError, "x must be a torch.Tensor"),
    "weight not a tensor": (dict(weight=None), TypeError, "weight must be a torch.Tensor"),
    "wrong K": (dict(x=torch.randn(3, 9)), ValueError, r"x must have shape \(\.\.\., 8\)"),
    "0-d x": (dict(x=torch.tensor(1.0)), ValueError, "x must have at least 1 dimension"),
    "1-d weight": (dict(weight=torch.randn(8)), ValueError, "weight must be 2-D"),
    "bias wrong N": (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
    "lora_a a tensor": (dict(lora_a=torch.randn(2, 8)), TypeError, "lora_a must be a list or tuple"),
    "lora_b a tensor": (dict(lora_b=torch.randn(6, 2)), TypeError, "lora_b must be a list or tuple"),
    "scalings a float": (dict(scalings=1.0), TypeError, "scalings must be a list or tuple"),
    "lora_b too short": (dict(lora_b=[torch.randn(6, 2)]), ValueError, r"lora_b must have one entry per adapter \(2"),
    "scalings too long": (dict(scalings=[1.0, 2.0, 3.0]), ValueError, "scalings must have one entry per adapter"),
    "scaling a tensor": (dict(scalings=[1.0, torch.tensor(2.0)]), TypeError, r"scalings\[1\] must be a Python float"),
    "scaling a bool": (dict(scalings=[True, 1.0]), TypeError, r"scalings\[0\] must be a Python float"),
    "scaling NaN": (dict(scalings=[1.0, math.nan]), ValueError, r"scalings\[1\] must be finite, got nan"),
    "scaling -inf": (dict(scalings=[-math.inf, 1.0]), ValueError, r"scalings\[0\] must be finite, got -inf"),
    "scalings tensor wrong shape": (dict(scalings=torch.ones(3)), ValueError, r"scalings must have shape \(2,\)"),
    "scalings tensor 2-d": (dict(scalings=torch.ones(1, 2)), ValueError, r"scalings must have shape \(2,\)"),
    "scalings tensor integer": (dict(scalings=torch.ones(2, dtype=torch.int32)), TypeError, "scalings must be a float"),
    "scalings tensor on another device": (
        dict(scalings=torch.ones(2, device="meta")),
        ValueError,
        "scalings must be on x's device",
    ),
    "lora_a entry not a tensor": (dict(lora_a=[torch.randn(2, 8), None]), TypeError, r"lora_a\[1\] must be a torch"),
    "lora_a wrong K": (
        dict(lora_a=[torch.randn(2, 8), torch.randn(3, 7)]),
        ValueError,
        r"lora_a\[1\] must have shape \(r, 8\)",
    ),
    "rank 0": (
        dict(lora_a=[torch.randn(2, 8), torch.randn(0, 8)], lora_b=[torch.randn(6, 2), torch.randn(6, 0)]),
        ValueError,
        r"lora_a\[1\] must have rank r >= 1",
    ),
    "rank mismatch": (
        dict(lora_b=[torch.randn(6, 2), torch.randn(6, 4)]),
        ValueError,
        r"lora_b\[1\] must have shape \(6, 3\)",
    ),
    "integer x": (dict(x=torch.ones(3, 8, dtype=torch.int32)), TypeError, "x must be float16, bfloat16"),
    "weight dtype": (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, "weight must have x's dtype"),
    "adapters of two dtypes": (
        dict(lora_b=[torch.randn(6, 2), torch.randn(6, 3, dtype=torch.float64)]),
        TypeError,
        r"lora_b\[1\] must have lora_a\[0\]'s dtype",
    ),
    "fp16 adapters on fp32 x": (
        dict(
            lora_a=[torch.randn(2, 8, dtype=torch.float16), torch.randn(3, 8, dtype=torch.float16)],
            lora_b=[torch.randn(6, 2, dtype=torch.float16), torch.randn(6, 3, dtype=torch.float16)],
        ),
        TypeError,
        "lora_a and lora_b must have x's dtype",
    ),
    "adapter on another device": (
        dict(lora_a=[torch.randn(2, 8), torch.randn(3, 8, device="meta")]),
        ValueError,
        r"lora_a\[1\] must be on x's device",
    ),
    "dropout_p too short": (dict(dropout_p=[0.1]), ValueError, r"dropout_p must be one float or one per adapter \(2\)"),
    "dropout_p entry 1": (dict(dropout_p=[0.1, 1.0]), ValueError, r"dropout_p\[1\] must be a float in \[0, 1\)"),
    "dropout_p negative": (dict(dropout_p=-0.5), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    "dropout_p a str": (dict(dropout_p="0.1"), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    "seed negative": (dict(dropout_p=0.1, seed=-1), ValueError, "seed must be None or an int"),
    "adapter_ids a list": (dict(adapter_ids=[0, 1, 0]), TypeError, "adapter_ids must be a torch.Tensor"),
    "float adapter_ids": (dict(adapter_ids=torch.zeros(3)), TypeError, "adapter_ids must be an integer tensor"),
    "bool adapter_ids": (dict(adapter_ids=torch.zeros(3, dtype=torch.bool)), TypeError, "adapter_ids must be an int"),
    "adapter_ids wrong shape": (
        dict(adapter_ids=torch.zeros(4, dtype=torch.int64)),
        ValueError,
        r"adapter_ids must have x's leading shape \(3,\)",
    ),
    "adapter_ids one per batch entry of 2-d x": (
        dict(adapter_ids=torch.zeros(1, dtype=torch.int64)),
        ValueError,
        r"adapter_ids must have x's leading shape \(3,\)",
    ),
    "adapter_ids on another device": (
        dict(adapter_ids=torch.zeros(3, dtype=torch.int64, device="meta")),
        ValueError,
        "adapter_ids must be on x's device",
    ),
    "adapter_ids too large": (
        dict(adapter_ids=torch.tensor([0, 2, 1])),
        ValueError,
        r"adapter_ids must be -1 \(base only\) or an adapter index in \[0, 2\), got values in \[0, 2\]",
    ),
    "adapter_ids below -1": (dict(adapter_ids=torch.tensor([0, -2, 1])), ValueError, r"adapter_ids must .* \[-2, 1\]"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_input(case, monkeypatch):
    changes, error, message = BAD_INPUTS[case]

    def to_device(v):
        if isinstance(v, list):
            return [to_device(t) for t in v]
        if isinstance(v, torch.Tensor) and v.device.type != "meta":
            return v.to(DEVICE)
        return v

    args = {k: to_device(v) for k, v in good(**changes).items()}

    def no_kernel(*_, **__):
        raise AssertionError("a kernel ran before the input check")

    for module in (torch_backend, triton_backend):
        monkeypatch.setattr(module, "forward", no_kernel)
    with pytest.raises(error, match=f"^{message}"):
        multi_lora_linear(**args)
