"""The LoRA GEMM kernel (kernels/gemm.py: the forward and dX, one adapter or
many) through the Triton backend's primitives `forward` and `grad_x`, and
the plain GEMM it also runs, against float64 formulas: outputs poisoned with
NaN (out= / h_out= / g_out=), inputs inside NaN-padded buffers, odd shapes,
every dtype pair, both interpreter configs (on a GPU: the autotuned kernel).

    forward:  y = x W^T + bias + s H B^T,  H = dropout(x) A^T
    dX:       dX = dY W + D * (G A),       G = s dY B,  D = mask / (1 - p)

with many adapters per row, on the row's adapter (id -1: the base layer, H
and G zero)."""

import math

import pytest
import torch
from conftest import DEVICE, requires_cpu
from helpers import (
    DTYPE_PAIRS,
    PAIR_IDS,
    assert_error_near_torch,
    assert_matches_reference,
    f64,
    lora_inputs,
    multi_inputs,
    padded,
    poisoned,
    randn,
)

from fused_lora.backends import triton_backend
from fused_lora.batch import UNSORTED_MAX_ROWS, Adapters, group_rows
from fused_lora.kernels.gemm import lora_gemm

SCALING = 0.75
SEED = 1234


# --- float64 formulas ---------------------------------------------------------------------------------------------


def keep_factors(m, k, ids, dropout_p, seed):
    """(M, K) float64 dropout factors D = mask / (1 - p) of every row, with
    the row's adapter's p and the kernels' mask (dropout_mask with that p);
    None when no adapter drops."""
    if not any(p > 0 for p in dropout_p):
        return None
    factors = torch.ones(m, k, dtype=torch.float64)
    for a, p in enumerate(dropout_p):
        rows = (ids == a).nonzero().squeeze(1)
        if p > 0 and len(rows):
            mask = triton_backend.dropout_mask(m, k, p, seed, DEVICE).cpu()
            factors[rows] = mask[rows].double() / (1 - p)
    return factors


def reference(x, weight, bias, lora_a, lora_b, scalings, ids, dy=None, factors=None):
    """float64 per row i with adapter a = ids[i] (-1: none):
    y, H (forward) and, given dy, dX and G. factors: dropout's D or None."""
    x, weight, dy = f64(x), f64(weight), f64(dy)
    m, width = x.shape[0], max((a.shape[0] for a in lora_a), default=0)
    y = x @ weight.t() + (0 if bias is None else f64(bias))
    h = torch.zeros(m, width, dtype=torch.float64)
    dx = None if dy is None else dy @ weight
    g = None if dy is None else torch.zeros(m, width, dtype=torch.float64)
    for a, (lora_a_, lora_b_) in enumerate(zip(lora_a, lora_b, strict=True)):
        rows = (ids.cpu() == a).nonzero().squeeze(1)
        if not len(rows):
            continue
        a_, b_, s, r = f64(lora_a_), f64(lora_b_), float(scalings[a]), lora_a_.shape[0]
        d = x[rows] if factors is None else x[rows] * factors[rows]
        h[rows, :r] = d @ a_.t()
        y[rows] += s * h[rows, :r] @ b_.t()
        if dy is not None:
            g[rows, :r] = s * dy[rows] @ b_
            update = g[rows, :r] @ a_
            dx[rows] += update if factors is None else update * factors[rows]
    return y, h, dx, g


# --- launches -----------------------------------------------------------------------------------------------------


def one_adapter(inputs, scaling=SCALING, dropout_p=0.0):
    """Adapters of one adapter from lora_inputs, A and B inside NaN padding."""
    scalings = torch.tensor([scaling], dtype=torch.float32, device=DEVICE)
    return Adapters([padded(inputs["lora_a"])], [padded(inputs["lora_b"])], scalings, [dropout_p])


def many_adapters(inputs, dropout_p=None, scalings=None):
    """Adapters from multi_inputs, every A and B inside NaN padding."""
    n = len(inputs["lora_a"])
    if scalings is None:
        scalings = torch.tensor(inputs["scalings"], dtype=torch.float32, device=DEVICE)
    return Adapters(
        [padded(a) for a in inputs["lora_a"]],
        [padded(b) for b in inputs["lora_b"]],
        scalings,
        [0.0] * n if dropout_p is None else list(dropout_p),
    )


def rows_of(inputs, sort=None):
    """The rows as the functional API groups them: sorted past one row tile."""
    ids = inputs["adapter_ids"]
    sort = ids.numel() > UNSORTED_MAX_ROWS if sort is None else sort
    return group_rows(ids, len(inputs["lora_a"]), DEVICE, sort=sort)


def width_and_dtype(inputs):
    lora_a = inputs["lora_a"]
    lora_a = lora_a if isinstance(lora_a, list) else [lora_a]
    return max((a.shape[0] for a in lora_a), default=0), lora_a[0].dtype if lora_a else inputs["x"].dtype


def run_forward(inputs, adapters, rows, seed=0):
    """forward() on NaN-padded x / W / bias into poisoned y and H."""
    m, n = inputs["x"].shape[0], inputs["weight"].shape[0]
    width, adapter_dtype = width_and_dtype(inputs)
    out = poisoned((m, n), inputs["x"].dtype, DEVICE)
    h_out = poisoned((m, width), adapter_dtype, DEVICE)
    bias = None if inputs["bias"] is None else padded(inputs["bias"])
    y, h = triton_backend.forward(
        padded(inputs["x"]), padded(inputs["weight"]), bias, adapters, rows, seed, out=out, h_out=h_out
    )
    assert y is out, "forward must write y into out="
    if adapters.count:
        assert h is h_out, "forward must write H into h_out="
    assert h.shape == (m, width)
    return y, h


def run_dx(inputs, adapters, rows, dy, seed=0, compute_dx=True):
    """grad_x() on NaN-padded dY / W into poisoned dX and G."""
    m, k = inputs["x"].shape
    width, adapter_dtype = width_and_dtype(inputs)
    out = poisoned((m, k), inputs["x"].dtype, DEVICE) if compute_dx else None
    g_out = poisoned((m, width), adapter_dtype, DEVICE)
    dx, g = triton_backend.grad_x(
        padded(dy), padded(inputs["weight"]), adapters, rows, seed, compute_dx=compute_dx, out=out, g_out=g_out
    )
    assert dx is out, "grad_x must write dX into out= (None without compute_dx)"
    if adapters.count:
        assert g is g_out, "grad_x must write G into g_out="
    assert g.shape == (m, width)
    return dx, g


def grad_output(inputs):
    m, n = inputs["x"].shape[0], inputs["weight"].shape[0]
    return randn(m, n, dtype=inputs["x"].dtype, device=DEVICE)


def check_one(inputs, dtype, adapter_dtype, forward=True, dx=True, dropout_p=0.0, seed=0):
    """One adapter: forward (y, H) and dX (dX, G) against float64."""
    adapters = one_adapter(inputs, dropout_p=dropout_p)
    m, k = inputs["x"].shape
    ids = torch.zeros(m, dtype=torch.int64)
    factors = keep_factors(m, k, ids, [dropout_p], seed)
    dy = grad_output(inputs)
    y_ref, h_ref, dx_ref, g_ref = reference(
        inputs["x"], inputs["weight"], inputs["bias"], [inputs["lora_a"]], [inputs["lora_b"]], [SCALING], ids, dy,
        factors,
    )  # fmt: skip
    if forward:
        y, h = run_forward(inputs, adapters, None, seed)
        assert_matches_reference(y, y_ref, dtype, name="y")
        assert_matches_reference(h, h_ref, adapter_dtype, name="H")
    if dx:
        dx_, g = run_dx(inputs, adapters, None, dy, seed)
        assert_matches_reference(dx_, dx_ref, dtype, "gradients", name="dX")
        assert_matches_reference(g, g_ref, adapter_dtype, "gradients", name="G")
    return factors


def check_many(inputs, dtype, adapter_dtype, forward=True, dx=True, dropout_p=None, seed=0, sort=None):
    """Many adapters: forward (y, H) and dX (dX, G) against per-row float64."""
    adapters = many_adapters(inputs, dropout_p)
    rows = rows_of(inputs, sort)
    m, k = inputs["x"].shape
    ids = inputs["adapter_ids"].cpu()
    factors = keep_factors(m, k, ids, adapters.dropout_p, seed)
    dy = grad_output(inputs)
    y_ref, h_ref, dx_ref, g_ref = reference(
        inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"], inputs["scalings"], ids,
        dy, factors,
    )  # fmt: skip
    y = None
    if forward:
        y, h = run_forward(inputs, adapters, rows, seed)
        assert_matches_reference(y, y_ref, dtype, name="y")
        assert_matches_reference(h, h_ref, adapter_dtype, name="H")
    if dx:
        dx_, g = run_dx(inputs, adapters, rows, dy, seed)
        assert_matches_reference(dx_, dx_ref, dtype, "gradients", name="dX")
        assert_matches_reference(g, g_ref, adapter_dtype, "gradients", name="G")
    return y


# --- one adapter --------------------------------------------------------------------------------------------------

# (M, K, N, r): no dimension a multiple of the blocks, r = 1 and r not a power
# of two, M = 0 and 1.
SHAPES = [(0, 48, 16, 4), (1, 48, 100, 1), (7, 100, 48, 16), (33, 257, 100, 33), (130, 100, 257, 5)]
# Cheap enough for the small config's 16^3 tiles: several K steps, several
# tiles per row and column, edge masks on every side.
SMALL_SHAPES = [(1, 16, 16, 1), (33, 48, 33, 7), (20, 37, 70, 17)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(shape, dtype, adapter_dtype, bias):
    inputs = lora_inputs(*shape, dtype, adapter_dtype, device=DEVICE, bias=bias)
    check_one(inputs, dtype, adapter_dtype, dx=False)


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dx_and_g_match_reference(shape, dtype, adapter_dtype):
    inputs = lora_inputs(*shape, dtype, adapter_dtype, device=DEVICE, bias=False)
    check_one(inputs, dtype, adapter_dtype, forward=False)


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_forward_and_dx_in_both_configs(shape, dtype, adapter_dtype, config):
    inputs = lora_inputs(*shape, dtype, adapter_dtype, device=DEVICE)
    check_one(inputs, dtype, adapter_dtype)


@pytest.mark.parametrize("shape", [(33, 100, 48, 16), (20, 37, 70, 17)], ids=str)
def test_g_alone_without_dx(shape, config):
    """x needs no gradient but A does: the kernel forms G alone (no dX)."""
    inputs = lora_inputs(*shape, torch.bfloat16, torch.float32, device=DEVICE, bias=False)
    dy = grad_output(inputs)
    dx, g = run_dx(inputs, one_adapter(inputs), None, dy, compute_dx=False)
    assert dx is None
    g_ref = SCALING * f64(dy) @ f64(inputs["lora_b"])
    assert_matches_reference(g, g_ref, torch.float32, "gradients", name="G")


@pytest.mark.parametrize(
    ("r", "dtype", "adapter_dtype"),
    [(64, torch.bfloat16, torch.bfloat16), (128, torch.float32, torch.float32), (256, torch.bfloat16, torch.float32)],
    ids=["r64-bf16", "r128-fp32", "r256-bf16-fp32A"],
)
def test_large_ranks(r, dtype, adapter_dtype, config):
    """R_PAD up to 256: the (BLOCK_M x R_PAD) accumulator, and r spanning
    several 16-wide steps of the small config's tiles."""
    inputs = lora_inputs(33, 100, 70, r, dtype, adapter_dtype, device=DEVICE)
    check_one(inputs, dtype, adapter_dtype)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_zero_k_gives_bias_and_zero_h(bias):
    """K = 0: no K loop; y = bias (or 0), H = 0, and dX is (M, 0) with
    G = s dY B still formed."""
    inputs = lora_inputs(5, 0, 7, 3, torch.float32, device=DEVICE, bias=bias)
    y, h = run_forward(inputs, one_adapter(inputs), None)
    expected = inputs["bias"].expand(5, 7) if bias else torch.zeros(5, 7, device=DEVICE)
    assert torch.equal(y, expected)
    assert torch.equal(h, torch.zeros(5, 3, device=DEVICE))
    dy = grad_output(inputs)
    dx, g = run_dx(inputs, one_adapter(inputs), None, dy)
    assert dx.shape == (5, 0)
    assert_matches_reference(g, SCALING * f64(dy) @ f64(inputs["lora_b"]), torch.float32, "gradients", name="G")


def test_zero_n_gives_h_and_zero_gradients():
    """N = 0: y is (M, 0) while H = x A^T is still formed; dY is (M, 0), so
    dX and G are zero."""
    inputs = lora_inputs(9, 48, 0, 4, torch.float32, device=DEVICE)
    y, h = run_forward(inputs, one_adapter(inputs), None)
    assert y.shape == (9, 0)
    assert_matches_reference(h, f64(inputs["x"]) @ f64(inputs["lora_a"]).t(), torch.float32, name="H")
    dx, g = run_dx(inputs, one_adapter(inputs), None, grad_output(inputs))
    assert torch.equal(dx, torch.zeros(9, 48, device=DEVICE))
    assert torch.equal(g, torch.zeros(9, 4, device=DEVICE))


def test_bf16_error_within_twice_torchs():
    """Second look: the kernel's bf16 error is within 2x of PyTorch's own bf16
    computation of the same layer, for y and for dX."""
    inputs = lora_inputs(64, 257, 130, 16, torch.bfloat16, device=DEVICE)
    x, w, b, a, bb = inputs.values()
    adapters = one_adapter(inputs)
    ids = torch.zeros(64, dtype=torch.int64)
    dy = grad_output(inputs)
    y_ref, _, dx_ref, _ = reference(x, w, b, [a], [bb], [SCALING], ids, dy)
    y, _ = run_forward(inputs, adapters, None)
    torch_y = torch.nn.functional.linear(x, w, b) + SCALING * ((x @ a.t()) @ bb.t())
    assert_error_near_torch(y, torch_y, y_ref, name="y")
    dx, _ = run_dx(inputs, adapters, None, dy)
    torch_dx = dy @ w + ((SCALING * dy @ bb) @ a)
    assert_error_near_torch(dx, torch_dx, dx_ref, name="dX")


@requires_cpu
def test_rows_past_int32_offsets():
    """Rows 2^20 elements apart: row 2048 of x, y, dY and dX starts at element
    2^31, past int32. Without int64 offsets the kernel would read and write
    wrapped addresses. (CPU: the storages are reserved, only the rows used are
    touched; on a GPU they would need 4 GiB each.)"""
    m, k, n, r, row_stride = 2049, 16, 16, 4, 2**20
    inputs = lora_inputs(m, k, n, r, torch.float16, device=DEVICE)

    def far_apart(cols, fill=None):
        t = torch.empty(row_stride * (m - 1) + cols, dtype=torch.float16, device=DEVICE).as_strided(
            (m, cols), (row_stride, 1)
        )
        return t.fill_(math.nan) if fill is None else t.copy_(fill)

    adapters = one_adapter(inputs)
    x, y = far_apart(k, inputs["x"]), far_apart(n)
    h = poisoned((m, r), torch.float16, DEVICE)
    triton_backend.forward(x, inputs["weight"], inputs["bias"], adapters, None, out=y, h_out=h)
    dy = grad_output(inputs)
    dx, g = far_apart(k), poisoned((m, r), torch.float16, DEVICE)
    triton_backend.grad_x(far_apart(n, dy), inputs["weight"], adapters, None, out=dx, g_out=g)
    ids = torch.zeros(m, dtype=torch.int64)
    y_ref, h_ref, dx_ref, g_ref = reference(
        inputs["x"], inputs["weight"], inputs["bias"], [inputs["lora_a"]], [inputs["lora_b"]], [SCALING], ids, dy
    )
    assert_matches_reference(y, y_ref, torch.float16, name="y")
    assert_matches_reference(h, h_ref, torch.float16, name="H")
    assert_matches_reference(dx, dx_ref, torch.float16, "gradients", name="dX")
    assert_matches_reference(g, g_ref, torch.float16, "gradients", name="G")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS[:3], ids=PAIR_IDS[:3])
def test_plain_gemm_without_adapters(dtype, adapter_dtype, bias, config):
    """adapters=None: the kernel's own GEMM (the benchmark's triton-base row)
    gives x W^T + bias and no H; with dx=True, dY W."""
    inputs = lora_inputs(33, 100, 70, 4, dtype, adapter_dtype, device=DEVICE, bias=bias)
    x, w, b = inputs["x"], inputs["weight"], inputs["bias"]
    out = poisoned((33, 70), dtype, DEVICE)
    y, h = lora_gemm(
        padded(x), padded(w), None if b is None else padded(b), None, dx=False, compute_y=True,
        base_precision="ieee", lora_precision="ieee", out=out,
    )  # fmt: skip
    assert y is out and h is None
    ref = f64(x) @ f64(w).t() + (0 if b is None else f64(b))
    assert_matches_reference(y, ref, dtype, name="y")
    dy = grad_output(inputs)
    out = poisoned((33, 100), dtype, DEVICE)
    dx, g = lora_gemm(
        padded(dy), padded(w), None, None, dx=True, compute_y=True, base_precision="ieee", lora_precision="ieee",
        out=out,
    )  # fmt: skip
    assert dx is out and g is None
    assert_matches_reference(dx, f64(dy) @ f64(w), dtype, "gradients", name="dX")


def strided_bias(n, kind):
    """A bias (n,) that is a strided view: every other element of a vector,
    or a column of a matrix."""
    if kind == "every-other":
        return randn(2 * n, device=DEVICE)[::2]
    return randn(n, 3, device=DEVICE)[:, 1]


@pytest.mark.parametrize("kind", ["every-other", "column"])
def test_strided_bias_is_read_with_its_stride(kind, config):
    """A non-contiguous bias is read through its stride in the LoRA forward
    (the reported case first: x (4, 8), W (6, 8), bias randn(12)[::2],
    A (2, 8), B (6, 2), s = 1 was off by several units), the multi-adapter
    forward and the plain GEMM."""
    for m, k, n, r in [(4, 8, 6, 2), (33, 48, 40, 5)]:
        inputs = lora_inputs(m, k, n, r, torch.float32, device=DEVICE)
        inputs["bias"] = strided_bias(n, kind)
        assert not inputs["bias"].is_contiguous()
        ids = torch.zeros(m, dtype=torch.int64)
        lora = ([inputs["lora_a"]], [inputs["lora_b"]])
        y_ref, _, _, _ = reference(inputs["x"], inputs["weight"], inputs["bias"], *lora, [1.0], ids)
        scalings = torch.ones(1, device=DEVICE)
        y = triton_backend.forward(
            inputs["x"], inputs["weight"], inputs["bias"], Adapters(*lora, scalings, [0.0]), None
        )[0]
        assert_matches_reference(y, y_ref, torch.float32, name=f"y (one adapter, {m}x{k}x{n})")
        rows = group_rows(ids.to(DEVICE), 1, DEVICE, sort=m > UNSORTED_MAX_ROWS)
        y = triton_backend.forward(
            inputs["x"], inputs["weight"], inputs["bias"], Adapters(*lora, scalings, [0.0]), rows
        )[0]
        assert_matches_reference(y, y_ref, torch.float32, name=f"y (many adapters, {m}x{k}x{n})")
        base_ref = f64(inputs["x"]) @ f64(inputs["weight"]).t() + f64(inputs["bias"])
        y, _ = lora_gemm(
            inputs["x"], inputs["weight"], inputs["bias"], None, dx=False, compute_y=True,
            base_precision="ieee", lora_precision="ieee",
        )  # fmt: skip
        assert_matches_reference(y, base_ref, torch.float32, name=f"y (plain GEMM, {m}x{k}x{n})")


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize(("dtype", "adapter_dtype"), [DTYPE_PAIRS[0], DTYPE_PAIRS[3]], ids=["fp32", "bf16-fp32A"])
def test_dropout_masks_h_and_the_dx_update(p, dtype, adapter_dtype, config):
    """Forward H = dropout(x) A^T and dX's G A term masked, with the mask
    dropout_mask(m, k, p, seed) regenerates (G itself is not masked)."""
    inputs = lora_inputs(33, 48, 40, 7, dtype, adapter_dtype, device=DEVICE)
    factors = check_one(inputs, dtype, adapter_dtype, dropout_p=p, seed=SEED)
    kept = (factors > 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.06, f"the mask keeps {kept:.3f} of x, expected about {1 - p}"
    other = triton_backend.dropout_mask(33, 48, p, SEED + 1, DEVICE).cpu()
    assert not torch.equal(other, factors > 0), "another seed must give another mask"


# --- many adapters ------------------------------------------------------------------------------------------------

# (M, K, N, ranks, assignment): no dimension a multiple of the blocks, ranks
# 1 to 33 differing, M = 0 and 1, M <= 16 (rows taken unsorted) and above.
CASES = [
    (0, 48, 16, [4, 2], "uniform"),
    (1, 48, 100, [1], "one"),
    (7, 100, 48, [16, 3, 5], "uniform"),
    (33, 257, 100, [33, 1, 8, 16], "skewed"),
    (130, 100, 70, [5, 2, 16, 7, 1], "uniform"),
]
CASE_IDS = ["M0", "M1-one", "M7-unsorted", "M33-skewed", "M130-uniform"]


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_many_adapters_forward_matches_reference(case, dtype, adapter_dtype):
    m, k, n, ranks, assignment = case
    inputs = multi_inputs(m, k, n, ranks, dtype, adapter_dtype, assignment, device=DEVICE)
    check_many(inputs, dtype, adapter_dtype, dx=False)


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_many_adapters_dx_and_g_match_reference(case, dtype, adapter_dtype):
    m, k, n, ranks, assignment = case
    inputs = multi_inputs(m, k, n, ranks, dtype, adapter_dtype, assignment, bias=False, device=DEVICE)
    check_many(inputs, dtype, adapter_dtype, forward=False)


# 16^3 tiles: several K and N steps, several adapters per tile and several
# tiles per adapter, edge masks on every side; M <= 16 unsorted.
SMALL_CASES = [
    (33, 48, 33, [7, 1, 16], "uniform"),
    (40, 37, 20, [17, 4], "skewed"),
    (16, 48, 20, [3, 5, 2], "uniform"),
]


@pytest.mark.parametrize(("dtype", "adapter_dtype"), [DTYPE_PAIRS[0], DTYPE_PAIRS[3]], ids=["fp32", "bf16-fp32A"])
@pytest.mark.parametrize("case", SMALL_CASES, ids=["uniform", "skewed", "M16-unsorted"])
def test_many_adapters_in_both_configs(case, dtype, adapter_dtype, config):
    m, k, n, ranks, assignment = case
    inputs = multi_inputs(m, k, n, ranks, dtype, adapter_dtype, assignment, device=DEVICE)
    check_many(inputs, dtype, adapter_dtype)


def test_many_adapters_g_alone_without_dx(config):
    """x needs no gradient but the adapters do: the kernel forms G alone."""
    inputs = multi_inputs(33, 100, 48, [16, 3], torch.bfloat16, torch.float32, device=DEVICE)
    dy = grad_output(inputs)
    dx, g = run_dx(inputs, many_adapters(inputs), rows_of(inputs), dy, compute_dx=False)
    assert dx is None
    ids = inputs["adapter_ids"].cpu()
    _, _, _, g_ref = reference(
        inputs["x"], inputs["weight"], None, inputs["lora_a"], inputs["lora_b"], inputs["scalings"], ids, dy
    )
    assert_matches_reference(g, g_ref, torch.float32, "gradients", name="G")


@pytest.mark.parametrize("assignment", ["base", "one"])
def test_base_rows_and_unused_adapters(assignment):
    """All rows base-only: y is the base layer, H and G are zero; all rows on
    the last adapter: the others contribute nothing."""
    inputs = multi_inputs(20, 48, 33, [4, 16, 2], torch.float32, assignment=assignment, device=DEVICE)
    check_many(inputs, torch.float32, torch.float32)
    if assignment == "base":
        y, h = run_forward(inputs, many_adapters(inputs), rows_of(inputs))
        assert not h.any()
        base = f64(inputs["x"]) @ f64(inputs["weight"]).t() + f64(inputs["bias"])
        assert_matches_reference(y, base, torch.float32, name="y")


@pytest.mark.parametrize("m", [5, 20], ids=["unsorted", "sorted"])
def test_no_adapters_at_all(m):
    """Empty adapter lists: the plain GEMM on every row, H and G of width 0."""
    inputs = multi_inputs(m, 48, 33, [], torch.float32, device=DEVICE)
    check_many(inputs, torch.float32, torch.float32)


def test_many_adapters_zero_k_gives_bias():
    inputs = multi_inputs(5, 0, 7, [3, 2], torch.float32, assignment="uniform", device=DEVICE)
    y, h = run_forward(inputs, many_adapters(inputs), rows_of(inputs))
    assert torch.equal(y, inputs["bias"].expand(5, 7))
    assert torch.equal(h, torch.zeros(5, 3, device=DEVICE))


@pytest.mark.slow
def test_64_adapters_of_ranks_1_to_64(config):
    """64 adapters of ranks 1..64 over 150 rows: tiles of up to 16 (small) or
    64 (large) adapters, R_PAD = 64."""
    inputs = multi_inputs(150, 40, 24, list(range(1, 65)), torch.float32, device=DEVICE)
    check_many(inputs, torch.float32, torch.float32)


@pytest.mark.parametrize("m", [16, 40])
def test_sorted_and_unsorted_rows_give_the_same_y(m, config):
    """The sort changes which rows share a tile, never which row gets what."""
    inputs = multi_inputs(m, 48, 33, [4, 8, 2], torch.float32, device=DEVICE)
    unsorted = check_many(inputs, torch.float32, torch.float32, dx=False, sort=False)
    resorted = check_many(inputs, torch.float32, torch.float32, dx=False, sort=True)
    torch.testing.assert_close(unsorted, resorted, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [12, 40], ids=["unsorted", "sorted"])
def test_per_adapter_dropout(m, config):
    """Each row is dropped with its adapter's p (0 for one adapter, none for
    base rows), with the mask dropout_mask gives for that p at the row's own
    (caller's) index, whatever the sort: forward H and dX's G A term."""
    dropout_p = [0.0, 0.25, 0.6, 0.1]
    inputs = multi_inputs(m, 48, 33, [4, 8, 2, 5], torch.float32, device=DEVICE)
    inputs["adapter_ids"] = torch.arange(m, device=DEVICE) % 5 - 1  # every adapter and base rows
    check_many(inputs, torch.float32, torch.float32, dropout_p=dropout_p, seed=SEED)


def test_scalings_tensor_of_any_values(config):
    """Scalings are data: negative, zero and large values, one per adapter."""
    inputs = multi_inputs(40, 48, 33, [4, 8, 2], torch.float32, device=DEVICE)
    inputs["scalings"] = [-1.5, 0.0, 8.0]
    check_many(inputs, torch.float32, torch.float32)


def test_strided_scalings_tensor_is_read_with_its_stride():
    """An (n,) scalings tensor that is a strided view (multi_lora_linear takes
    one as it is) gives each adapter its own value, in y and in G."""
    inputs = multi_inputs(40, 48, 33, [4, 8, 2], torch.float32, device=DEVICE)
    storage = torch.tensor([0.5, 100.0, -2.0, 100.0, 3.0, 100.0], device=DEVICE)
    inputs["scalings"] = [0.5, -2.0, 3.0]
    adapters = many_adapters(inputs, scalings=storage[::2])
    rows = rows_of(inputs)
    dy = grad_output(inputs)
    ids = inputs["adapter_ids"].cpu()
    y_ref, _, _, g_ref = reference(
        inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"], inputs["scalings"], ids, dy
    )
    y, _ = run_forward(inputs, adapters, rows)
    assert_matches_reference(y, y_ref, torch.float32, name="y")
    _, g = run_dx(inputs, adapters, rows, dy)
    assert_matches_reference(g, g_ref, torch.float32, "gradients", name="G")
