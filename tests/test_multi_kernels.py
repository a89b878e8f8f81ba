"""The multi-adapter kernels' launchers (the Triton backend's primitives)
against float64 per-row formulas: poisoned outputs, inputs padded in NaN,
odd shapes, ranks that differ, skewed and uniform assignments, both
interpreter configs (on a GPU: the autotuned kernels)."""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_matches_reference, padded, poisoned
from test_forward import DTYPE_PAIRS, INTERPRETER_CONFIGS, PAIR_IDS

from fused_lora import multi_triton_backend as backend
from fused_lora.kernels import configs
from fused_lora.multi_reference import multi_lora_reference
from fused_lora.multi_rows import RowGroups, group_rows


def assign(m, n, assignment):
    """adapter_ids (m,) for n adapters, in random row order. uniform: every
    adapter and -1 alike; skewed: 80% of rows on one adapter; one: all rows
    on the last adapter; base: no adapter at all."""
    if assignment == "base" or n == 0:
        return torch.full((m,), -1, dtype=torch.int64)
    if assignment == "one":
        return torch.full((m,), n - 1, dtype=torch.int64)
    ids = torch.randint(-1, n, (m,))
    if assignment == "skewed":
        ids = torch.where(torch.rand(m) < 0.8, n // 2, ids)
    return ids


def multi_inputs(m, k, n, ranks, dtype, adapter_dtype=None, assignment="uniform", bias=True):
    """x (m, k), W (n, k), bias (n,), adapters A_a (r_a, k), B_a (n, r_a)
    (random B: never the zero a fresh adapter starts with), their scalings
    and adapter_ids (m,)."""
    adapter_dtype = adapter_dtype or dtype

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dt)

    return dict(
        x=randn(m, k),
        weight=randn(n, k, scale=max(k, 1) ** -0.5),
        bias=randn(n) if bias else None,
        lora_a=[randn(r, k, scale=max(k, 1) ** -0.5, dt=adapter_dtype) for r in ranks],
        lora_b=[randn(n, r, scale=r**-0.5, dt=adapter_dtype) for r in ranks],
        scalings=[0.5 + 0.25 * i for i in range(len(ranks))],
        adapter_ids=assign(m, len(ranks), assignment).to(DEVICE),
    )


def f64(t):
    return t.detach().to("cpu", torch.float64)


def per_row(ids, ranks, row_value):
    """(M, max rank) float64: row i = row_value(i, a)[:r_a] for a = ids[i] >= 0, zeros elsewhere."""
    out = torch.zeros(len(ids), max(ranks, default=0), dtype=torch.float64)
    for i, a in enumerate(ids.tolist()):
        if a >= 0:
            out[i, : ranks[a]] = row_value(i, a)
    return out


def run_forward(inputs):
    m, n = inputs["x"].shape[0], inputs["weight"].shape[0]
    ranks = [a.shape[0] for a in inputs["lora_a"]]
    adapter_dtype = inputs["lora_a"][0].dtype if ranks else inputs["x"].dtype
    pad = {name: None if t is None else padded(t) for name, t in inputs.items() if name in ("x", "weight", "bias")}
    out = poisoned((m, n), inputs["x"].dtype, DEVICE)
    h_out = poisoned((m, max(ranks, default=0)), adapter_dtype, DEVICE)
    groups = backend.group_rows(inputs["adapter_ids"], len(ranks), DEVICE)
    y, h = backend.forward(
        pad["x"], pad["weight"], pad["bias"],
        [padded(a) for a in inputs["lora_a"]], [padded(b) for b in inputs["lora_b"]], inputs["scalings"],
        groups, out=out, h_out=h_out,
    )  # fmt: skip
    assert y is out and h is h_out
    ref = multi_lora_reference(*inputs.values())
    x, ids = f64(inputs["x"]), inputs["adapter_ids"].cpu()
    ref_h = per_row(ids, ranks, lambda i, a: f64(inputs["lora_a"][a]) @ x[i])
    return y, h, ref, ref_h


def run_dx(inputs, compute_dx=True):
    m, n = inputs["x"].shape[0], inputs["weight"].shape[0]
    k = inputs["weight"].shape[1]
    ranks = [a.shape[0] for a in inputs["lora_a"]]
    dtype, adapter_dtype = inputs["x"].dtype, inputs["lora_a"][0].dtype
    dy = torch.randn(m, n, dtype=torch.float64).to(DEVICE, dtype)
    out = poisoned((m, k), dtype, DEVICE) if compute_dx else None
    g_out = poisoned((m, max(ranks)), adapter_dtype, DEVICE)
    groups = backend.group_rows(inputs["adapter_ids"], len(ranks), DEVICE)
    dx, g = backend.backward_dx(
        padded(dy), padded(inputs["weight"]),
        [padded(a) for a in inputs["lora_a"]], [padded(b) for b in inputs["lora_b"]], inputs["scalings"],
        groups, compute_dx=compute_dx, out=out, g_out=g_out,
    )  # fmt: skip
    assert dx is out and g is g_out
    ids, s = inputs["adapter_ids"].cpu(), inputs["scalings"]
    g_ref = per_row(ids, ranks, lambda i, a: s[a] * f64(dy)[i] @ f64(inputs["lora_b"][a]))
    dx_ref = f64(dy) @ f64(inputs["weight"])
    for i, a in enumerate(ids.tolist()):
        if a >= 0:
            dx_ref[i] += g_ref[i, : ranks[a]] @ f64(inputs["lora_a"][a])
    return dx, g, dx_ref, g_ref


@pytest.fixture(params=INTERPRETER_CONFIGS)
def config(request):
    if request.param == "autotuned":
        yield
    else:
        with configs.use_interpreter_config(request.param):
            yield request.param


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
def test_forward_matches_reference(case, dtype, adapter_dtype):
    m, k, n, ranks, assignment = case
    with configs.use_interpreter_config("large"):
        y, h, ref, ref_h = run_forward(multi_inputs(m, k, n, ranks, dtype, adapter_dtype, assignment))
    assert_matches_reference(y, ref, dtype, name="y")
    assert_matches_reference(h, ref_h, adapter_dtype, name="H")


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", CASES[1:], ids=CASE_IDS[1:])
def test_dx_matches_reference(case, dtype, adapter_dtype):
    m, k, n, ranks, assignment = case
    with configs.use_interpreter_config("large"):
        dx, g, dx_ref, g_ref = run_dx(multi_inputs(m, k, n, ranks, dtype, adapter_dtype, assignment))
    assert_matches_reference(dx, dx_ref, dtype, "gradients", name="dX")
    assert_matches_reference(g, g_ref, adapter_dtype, "gradients", name="G")


# 16^3 tiles: several K and N iterations, several adapters per tile and
# several tiles per adapter, edge masks on every side.
SMALL_CASES = [(33, 48, 33, [7, 1, 16], "uniform"), (40, 37, 20, [17, 4], "skewed")]


@pytest.mark.parametrize(("dtype", "adapter_dtype"), [DTYPE_PAIRS[0], DTYPE_PAIRS[3]], ids=["fp32", "bf16-fp32A"])
@pytest.mark.parametrize("case", SMALL_CASES, ids=["uniform", "skewed"])
def test_multi_tile(case, dtype, adapter_dtype, config):
    inputs = multi_inputs(*case[:3], case[3], dtype, adapter_dtype, case[4])
    y, h, ref, ref_h = run_forward(inputs)
    assert_matches_reference(y, ref, dtype, name="y")
    assert_matches_reference(h, ref_h, adapter_dtype, name="H")
    dx, g, dx_ref, g_ref = run_dx(inputs)
    assert_matches_reference(dx, dx_ref, dtype, "gradients", name="dX")
    assert_matches_reference(g, g_ref, adapter_dtype, "gradients", name="G")


def test_g_without_dx(config):
    """x needs no gradient but the adapters do: the kernel forms G alone."""
    dx, g, _, g_ref = run_dx(multi_inputs(33, 100, 48, [16, 3], torch.bfloat16, torch.float32), compute_dx=False)
    assert dx is None
    assert_matches_reference(g, g_ref, torch.float32, "gradients", name="G")


@pytest.mark.parametrize("assignment", ["base", "one"])
def test_rows_without_adapters_and_unused_adapters(assignment):
    """All rows base-only: y is the base layer and H is zero; all rows on the
    last adapter: the others contribute nothing."""
    inputs = multi_inputs(20, 48, 33, [4, 16, 2], torch.float32, assignment=assignment)
    y, h, ref, ref_h = run_forward(inputs)
    assert_matches_reference(y, ref, torch.float32, name="y")
    assert_matches_reference(h, ref_h, torch.float32, name="H")
    if assignment == "base":
        assert not h.any()


def test_no_adapters_at_all():
    inputs = multi_inputs(20, 48, 33, [], torch.float32)
    y, h, ref, _ = run_forward(inputs)
    assert h.shape == (20, 0)
    assert_matches_reference(y, ref, torch.float32, name="y")


def test_zero_k_gives_bias():
    y, h, ref, ref_h = run_forward(multi_inputs(5, 0, 7, [3, 2], torch.float32))
    assert_matches_reference(y, ref, torch.float32, name="y")
    assert_matches_reference(h, ref_h, torch.float32, name="H")


def grad_references(inputs, wide, skinny, scaled):
    """Per adapter with rows: s_a * wide_a^T skinny_a[:, :r_a] in float64, else None."""
    ids = inputs["adapter_ids"].cpu()
    refs = []
    for a, lora_a in enumerate(inputs["lora_a"]):
        rows = (ids == a).nonzero().squeeze(1)
        s = inputs["scalings"][a] if scaled else 1.0
        r = lora_a.shape[0]
        refs.append(s * f64(wide)[rows].t() @ f64(skinny)[rows, :r] if len(rows) else None)
    return refs


# (M, P, ranks, assignment): M within one chunk of either interpreter config
# and well past it (a skewed adapter's rows split over several chunks that
# meet by atomics); an adapter with no rows gets None.
REDUCTION_CASES = [(1, 100, [1, 3], "one"), (33, 257, [33, 4], "uniform"), (300, 48, [16, 2, 5, 9], "skewed")]


def check_grads(case, dtype, adapter_dtype):
    m, p, ranks, assignment = case
    inputs = multi_inputs(m, p, p, ranks, dtype, adapter_dtype, assignment)
    wide = torch.randn(m, p, dtype=torch.float64).to(DEVICE, dtype)
    # G and H as the kernels leave them: zeros past each row's rank.
    ids = inputs["adapter_ids"].cpu()
    skinny = per_row(ids, ranks, lambda i, a: torch.randn(ranks[a], dtype=torch.float64)).to(DEVICE, adapter_dtype)
    groups = backend.group_rows(inputs["adapter_ids"], len(ranks), DEVICE)
    args = (inputs["lora_a"], inputs["lora_b"], inputs["scalings"], groups)
    das = backend.grad_a(padded(wide), padded(skinny), *args)
    dbs = backend.grad_b(padded(wide), padded(skinny), *args)
    refs_a = grad_references(inputs, wide, skinny, scaled=False)
    refs_b = grad_references(inputs, wide, skinny, scaled=True)
    for a, (da, db, da_ref, db_ref) in enumerate(zip(das, dbs, refs_a, refs_b, strict=True)):
        if da_ref is None:
            assert da is None and db is None, f"adapter {a} has no rows and must get no gradient"
            continue
        assert da.dtype == db.dtype == adapter_dtype
        assert_matches_reference(da, da_ref.t(), adapter_dtype, "gradients", name=f"dA[{a}]")
        assert_matches_reference(db, db_ref, adapter_dtype, "gradients", name=f"dB[{a}]")


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", REDUCTION_CASES, ids=str)
def test_grad_a_and_b_match_reference(case, dtype, adapter_dtype):
    with configs.use_interpreter_config("large"):
        check_grads(case, dtype, adapter_dtype)


@pytest.mark.parametrize("case", REDUCTION_CASES, ids=str)
def test_grad_a_and_b_multi_tile(case, config):
    """16-row steps, 16-wide P blocks and (small config) chunks of 32 rows:
    the skewed adapter's 240-odd rows meet from eight programs by atomics."""
    check_grads(case, torch.float32, torch.float32)


@pytest.mark.slow
def test_64_adapters_ranks_1_to_64(config):
    """64 adapters of ranks 1..64 over 150 rows: tiles of up to 16 (small) or
    64 (large) adapters, R_PAD = 64."""
    ranks = list(range(1, 65))
    inputs = multi_inputs(150, 40, 24, ranks, torch.float32, assignment="uniform")
    y, h, ref, ref_h = run_forward(inputs)
    assert_matches_reference(y, ref, torch.float32, name="y")
    assert_matches_reference(h, ref_h, torch.float32, name="H")
    dx, g, dx_ref, g_ref = run_dx(inputs)
    assert_matches_reference(dx, dx_ref, torch.float32, "gradients", name="dX")
    assert_matches_reference(g, g_ref, torch.float32, "gradients", name="G")


def test_sorting_only_regroups():
    """The forward with and without the internal sort gives the same y: the
    sort changes which rows share a tile, never which row gets what."""
    inputs = multi_inputs(16, 48, 33, [4, 8, 2], torch.float32)
    groups = backend.group_rows(inputs["adapter_ids"], 3, DEVICE)
    assert not groups.sorted, "a batch of one row tile runs unsorted"
    args = [inputs[name] for name in ("x", "weight", "bias", "lora_a", "lora_b", "scalings")]
    unsorted, _ = backend.forward(*args, groups)
    resorted, _ = backend.forward(*args, groups.sort())
    torch.testing.assert_close(unsorted, resorted, rtol=1e-6, atol=1e-6)


def test_grouping_on_device_and_host_agree():
    """adapter_ids on x's device are sorted and counted there; on the CPU, on
    the host: the same order and segments either way (on a CPU-only machine
    the device path runs through a RowGroups without host_ids)."""
    ids = assign(300, 5, "skewed").to(torch.int32)
    host = group_rows(ids, 5, DEVICE)
    device = RowGroups(ids.to(DEVICE), 5).sort()
    assert host.host_ids is not None and device.host_ids is None
    assert torch.equal(host.order.cpu(), device.order.cpu())
    assert torch.equal(host.sorted_ids.cpu(), device.sorted_ids.cpu())
    assert host.segments() == device.segments()
    counts = {a: end - first for a, first, end in host.segments()}
    assert counts == {a: int((ids == a).sum()) for a in range(5) if (ids == a).any()}
    assert torch.equal(ids[host.order.long().cpu()], host.sorted_ids.cpu())
