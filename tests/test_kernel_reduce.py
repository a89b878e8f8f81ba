"""The dA / dB reduction kernel (kernels/reduce.py) through the Triton
backend's primitives `grad_a` and `grad_b`, against float64 formulas:

    dA_a = G_a^T dropout(x_a)   (r_a, K)        dB_a = s_a dY_a^T H_a   (N, r_a)

over the rows of each adapter (one adapter: all rows). Outputs poisoned with
NaN (out=, one adapter), inputs inside NaN-padded buffers, odd shapes, every
dtype pair, both interpreter configs; M within one chunk of rows (a direct
store) and past it (partial sums by atomics, or under
torch.use_deterministic_algorithms(True) by a workspace of pieces summed in
order), and the three modes agreeing."""

import contextlib

import pytest
import torch
from conftest import DEVICE, interpreted_only, requires_cuda
from helpers import DTYPE_PAIRS, PAIR_IDS, assert_matches_reference, assign, f64, padded, poisoned, randn

from fused_lora.backends import triton_backend
from fused_lora.batch import Adapters, group_rows
from fused_lora.kernels import configs
from fused_lora.kernels import reduce as reduce_module

SEED = 4321


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for the block, then the
    previous setting again."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def mode_value(mode) -> int:
    """A reduction mode as a plain int (the kernel's constants may be tl.constexpr)."""
    return int(getattr(mode, "value", mode))


@pytest.fixture
def modes(monkeypatch):
    """The MODE of every reduction launch (STORE, ATOMIC or PIECES), recorded
    on its way to the kernel: the tests below check that they ran the mode
    they mean to."""
    seen = []
    launch = reduce_module.launch

    def recording_launch(kernel, tuned, grid, args, flags, kind):
        seen.append(mode_value(flags["MODE"]))
        return launch(kernel, tuned, grid, args, flags, kind)

    monkeypatch.setattr(reduce_module, "launch", recording_launch)
    return seen


def adapters_for(ranks, k, n, adapter_dtype, scalings, dropout_p=None):
    """Adapters of these ranks: only their shapes, dtype, scalings and
    dropout p matter to the reductions."""
    return Adapters(
        [randn(r, k, dtype=adapter_dtype, device=DEVICE) for r in ranks],
        [randn(n, r, dtype=adapter_dtype, device=DEVICE) for r in ranks],
        torch.tensor(scalings, dtype=torch.float32, device=DEVICE),
        [0.0] * len(ranks) if dropout_p is None else list(dropout_p),
    )


def dropout_factors(m, k, ids, dropout_p, seed):
    """(M, K) float64 D = mask / (1 - p) with each row's adapter's p and the
    kernels' mask; ones where nothing drops."""
    factors = torch.ones(m, k, dtype=torch.float64)
    for a, p in enumerate(dropout_p):
        rows = (ids == a).nonzero().squeeze(1)
        if p > 0 and len(rows):
            mask = triton_backend.dropout_mask(m, k, p, seed, DEVICE).cpu()
            factors[rows] = mask[rows].double() / (1 - p)
    return factors


def references(x, g, dy, h, ids, ranks, scalings, factors=None):
    """float64 (dA_a, dB_a) per adapter; zeros for an adapter without rows."""
    x, g, dy, h = f64(x), f64(g), f64(dy), f64(h)
    d = x if factors is None else x * factors
    das, dbs = [], []
    for a, r in enumerate(ranks):
        rows = (ids == a).nonzero().squeeze(1)
        das.append(g[rows, :r].t() @ d[rows])
        dbs.append(scalings[a] * dy[rows].t() @ h[rows, :r])
    return das, dbs


# --- one adapter --------------------------------------------------------------------------------------------------


def check_one(m, k, n, r, dtype, adapter_dtype, dropout_p=0.0, seed=0, scaling=0.75):
    """grad_a / grad_b of one adapter into poisoned out= buffers, from padded
    x, G, dY, H, against float64."""
    x = randn(m, k, dtype=dtype, device=DEVICE)
    dy = randn(m, n, dtype=dtype, device=DEVICE)
    g = randn(m, r, dtype=adapter_dtype, device=DEVICE)
    h = randn(m, r, dtype=adapter_dtype, device=DEVICE)
    adapters = adapters_for([r], k, n, adapter_dtype, [scaling], [dropout_p])
    out_a = poisoned((r, k), adapter_dtype, DEVICE)
    out_b = poisoned((n, r), adapter_dtype, DEVICE)
    (da,) = triton_backend.grad_a(padded(x), padded(g), adapters, None, seed, out=out_a)
    (db,) = triton_backend.grad_b(padded(dy), padded(h), adapters, None, out=out_b)
    assert da is out_a and db is out_b, "grad_a / grad_b must write into out="
    ids = torch.zeros(m, dtype=torch.int64)
    factors = dropout_factors(m, k, ids, [dropout_p], seed) if dropout_p > 0 else None
    (da_ref,), (db_ref,) = references(x, g, dy, h, ids, [r], [scaling], factors)
    assert_matches_reference(da, da_ref, adapter_dtype, "gradients", name="dA")
    assert_matches_reference(db, db_ref, adapter_dtype, "gradients", name="dB")
    return da, db, factors


# (M, P, r), P both K and N: M within one chunk of rows of either config and
# past one (the small config's 32, the large one's 256), M = 0 and 1, r from 1
# to 256.
SHAPES = [(0, 48, 4), (1, 100, 1), (33, 257, 33), (300, 48, 16), (130, 70, 256)]
# Cheap enough for the small config (16-row steps, 16-wide P tiles).
SMALL_SHAPES = [(1, 100, 1), (33, 48, 5), (70, 37, 17), (300, 16, 4)]


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_grad_a_and_b_match_reference(shape, dtype, adapter_dtype):
    m, p, r = shape
    check_one(m, p, p + 3, r, dtype, adapter_dtype)


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_grad_a_and_b_in_both_configs(shape, dtype, adapter_dtype, config):
    m, p, r = shape
    check_one(m, p, p + 3, r, dtype, adapter_dtype)


def test_zero_rows_give_zeros():
    """M = 0: nothing to reduce, and out= is zeroed, not left poisoned; many
    adapters: every one gets zeros."""
    da, db, _ = check_one(0, 48, 20, 4, torch.float32, torch.float32)
    assert torch.equal(da, torch.zeros(4, 48, device=DEVICE)) and torch.equal(db, torch.zeros(20, 4, device=DEVICE))
    das, dbs = check_many(0, 48, 20, [4, 2], "uniform", torch.float32, torch.float32)
    assert not any(t.any() for t in (*das, *dbs))


def test_zero_k_and_n_give_empty_gradients():
    da, db, _ = check_one(5, 0, 0, 4, torch.float32, torch.float32)
    assert da.shape == (4, 0) and db.shape == (0, 4)


@pytest.mark.parametrize("p", [0.2, 0.5])
@pytest.mark.parametrize(("dtype", "adapter_dtype"), [DTYPE_PAIRS[0], DTYPE_PAIRS[3]], ids=["fp32", "bf16-fp32A"])
def test_dropout_on_grad_a(p, dtype, adapter_dtype, config):
    """dA = G^T dropout(x) with the mask dropout_mask(m, k, p, seed) gives,
    over several chunks of rows in the small config (dB has no dropout)."""
    _, _, factors = check_one(70, 48, 20, 5, dtype, adapter_dtype, dropout_p=p, seed=SEED)
    assert 0 < (factors > 0).double().mean() < 1, "the mask must drop some elements and keep others"


# --- many adapters ------------------------------------------------------------------------------------------------


def per_row(ids, ranks, dtype):
    """(M, max rank) random values on row i's first r_a columns (a = ids[i]),
    zeros past them and on rows without an adapter: G and H as the GEMM
    leaves them."""
    out = torch.zeros(len(ids), max(ranks), dtype=torch.float64)
    for i, a in enumerate(ids.tolist()):
        if a >= 0:
            out[i, : ranks[a]] = torch.randn(ranks[a], dtype=torch.float64)
    return out.to(DEVICE, dtype)


def check_many(m, k, n, ranks, assignment, dtype, adapter_dtype, ids=None, dropout_p=None, seed=0, scalings=None):
    """grad_a / grad_b per adapter of many, from padded x, G, dY, H, against
    float64; an adapter without rows gets zeros. Returns (dAs, dBs)."""
    ids = assign(m, len(ranks), assignment) if ids is None else ids
    scale_values = [0.5 + 0.25 * a for a in range(len(ranks))]
    adapters = adapters_for(ranks, k, n, adapter_dtype, scale_values, dropout_p)
    if scalings is not None:
        adapters = adapters._replace(scalings=scalings)
    x = randn(m, k, dtype=dtype, device=DEVICE)
    dy = randn(m, n, dtype=dtype, device=DEVICE)
    g, h = per_row(ids, ranks, adapter_dtype), per_row(ids, ranks, adapter_dtype)
    rows = group_rows(ids.to(DEVICE), len(ranks), DEVICE, sort=True)
    das = triton_backend.grad_a(padded(x), padded(g), adapters, rows, seed)
    dbs = triton_backend.grad_b(padded(dy), padded(h), adapters, rows)
    factors = dropout_factors(m, k, ids, adapters.dropout_p, seed) if adapters.has_dropout else None
    das_ref, dbs_ref = references(x, g, dy, h, ids, ranks, scale_values, factors)
    for a, r in enumerate(ranks):
        assert das[a].dtype == dbs[a].dtype == adapter_dtype
        if not (ids == a).any():
            assert torch.equal(das[a], torch.zeros(r, k, dtype=adapter_dtype, device=DEVICE)), f"dA[{a}] not zero"
            assert torch.equal(dbs[a], torch.zeros(n, r, dtype=adapter_dtype, device=DEVICE)), f"dB[{a}] not zero"
        assert_matches_reference(das[a], das_ref[a], adapter_dtype, "gradients", name=f"dA[{a}]")
        assert_matches_reference(dbs[a], dbs_ref[a], adapter_dtype, "gradients", name=f"dB[{a}]")
    return das, dbs


# (M, K, N, ranks, assignment): within one chunk of rows and past it (the
# skewed adapter's 240-odd rows over several chunks: eight of the small
# config's), ranks 1 to 33 differing; "one" leaves adapter 0 without rows,
# "base" every adapter.
CASES = [
    (1, 100, 48, [1, 3], "one"),
    (33, 257, 100, [33, 4], "uniform"),
    (300, 48, 37, [16, 2, 5, 9], "skewed"),
    (40, 48, 20, [5, 7], "base"),
]
CASE_IDS = ["M1-one", "M33-uniform", "M300-skewed", "M40-base"]


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_many_adapters_match_reference(case, dtype, adapter_dtype):
    check_many(*case, dtype, adapter_dtype)


@pytest.mark.parametrize(("dtype", "adapter_dtype"), [DTYPE_PAIRS[0], DTYPE_PAIRS[3]], ids=["fp32", "bf16-fp32A"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_many_adapters_in_both_configs(case, dtype, adapter_dtype, config):
    check_many(*case, dtype, adapter_dtype)


def test_adapters_without_rows_get_zeros(config):
    """Adapters 0 and 3 have no rows (between and beside adapters that do):
    zeros, while the others match."""
    ids = torch.tensor([1, 2, -1, 4, 2, 1, -1, 4] * 9)
    check_many(72, 40, 24, [3, 8, 2, 6, 5], None, torch.float32, torch.float32, ids=ids)


def test_per_adapter_dropout_on_grad_a(config):
    """dA_a = G_a^T dropout(x_a) with each adapter's own p, the mask of
    dropout_mask for that p at the rows' own indices."""
    ids = torch.arange(90) % 5 - 1
    check_many(90, 48, 20, [4, 8, 2, 5], None, torch.float32, torch.float32, ids=ids,
               dropout_p=[0.0, 0.25, 0.6, 0.1], seed=SEED)  # fmt: skip


def test_strided_scalings_tensor_is_read_with_its_stride():
    """An (n,) scalings tensor that is a strided view (multi_lora_linear takes
    one as it is) scales each adapter's dB by its own value."""
    storage = torch.tensor([0.5, 100.0, 0.75, 100.0, 1.0, 100.0], device=DEVICE)
    check_many(40, 24, 20, [4, 8, 2], "uniform", torch.float32, torch.float32, scalings=storage[::2])


# --- the three ways partial sums meet --------------------------------------------------------------------------


@interpreted_only
@pytest.mark.parametrize(
    ("dtype", "adapter_dtype"), [DTYPE_PAIRS[i] for i in (0, 2, 3)], ids=[PAIR_IDS[i] for i in (0, 2, 3)]
)
def test_direct_atomic_and_deterministic_modes_agree(dtype, adapter_dtype, modes):
    """M = 200 is one chunk of the large config (a direct store) and seven of
    the small one: partial sums by atomics, or under deterministic algorithms
    by pieces summed in chunk order, bitwise the same on a second run. All
    three match float64 and each other, for one adapter and for many."""
    m, k, n = 200, 40, 24
    assert configs.INTERPRETER_CONFIGS["small"]["split_m"] < m <= configs.INTERPRETER_CONFIGS["large"]["split_m"]
    x, dy = randn(m, k, dtype=dtype, device=DEVICE), randn(m, n, dtype=dtype, device=DEVICE)
    ranks = [5, 16, 3]
    ids = assign(m, 3, "skewed")
    g, h = per_row(ids, ranks, adapter_dtype), per_row(ids, ranks, adapter_dtype)
    multi = adapters_for(ranks, k, n, adapter_dtype, [0.5, 0.75, 1.25])
    rows = group_rows(ids.to(DEVICE), 3, DEVICE, sort=True)
    one = adapters_for([16], k, n, adapter_dtype, [0.75])
    g_one, h_one = randn(m, 16, dtype=adapter_dtype, device=DEVICE), randn(m, 16, dtype=adapter_dtype, device=DEVICE)

    def gradients():
        modes.clear()
        grads = [
            *triton_backend.grad_a(x, g_one, one, None),
            *triton_backend.grad_b(dy, h_one, one, None),
            *triton_backend.grad_a(x, g, multi, rows),
            *triton_backend.grad_b(dy, h, multi, rows),
        ]
        return grads, set(modes)

    with configs.use_interpreter_config("large"):
        direct, direct_modes = gradients()
    with configs.use_interpreter_config("small"):
        atomic, atomic_modes = gradients()
        with deterministic_algorithms():
            pieces, pieces_modes = gradients()
            again, _ = gradients()
    assert direct_modes == {mode_value(reduce_module.STORE)}
    assert atomic_modes == {mode_value(reduce_module.ATOMIC)}
    assert pieces_modes == {mode_value(reduce_module.PIECES)}

    zeros = torch.zeros(m, dtype=torch.int64)
    das_one, dbs_one = references(x, g_one, dy, h_one, zeros, [16], [0.75])
    das, dbs = references(x, g, dy, h, ids, ranks, [0.5, 0.75, 1.25])
    refs = [*das_one, *dbs_one, *das, *dbs]
    names = ["dA", "dB", *(f"dA[{a}]" for a in range(3)), *(f"dB[{a}]" for a in range(3))]
    for name, ref, *results in zip(names, refs, direct, atomic, pieces, again, strict=True):
        for mode, result in zip(["direct", "atomic", "deterministic"], results[:3], strict=True):
            assert_matches_reference(result, ref, adapter_dtype, "gradients", name=f"{name} ({mode})")
            # The same fp32 products summed in another order: a few fp32 ulps
            # apart, then rounded once to the adapters' dtype.
            tol = 16 * torch.finfo(adapter_dtype).eps
            torch.testing.assert_close(
                result, results[0], rtol=tol, atol=tol * ref.abs().max().item(), msg=f"{name}: {mode} vs direct"
            )
        assert torch.equal(results[2], results[3]), f"{name}: deterministic mode not bitwise repeatable"


@requires_cuda
def test_deterministic_mode_is_bitwise_repeatable_on_gpu(modes):
    """Under torch.use_deterministic_algorithms(True), dA and dB of a large
    bf16 batch are bitwise the same over 5 runs, for one adapter and for many
    (with atomics, the order of the additions varies)."""
    m, k, n, r = 8192, 1024, 1024, 16
    x, dy = randn(m, k, dtype=torch.bfloat16, device=DEVICE), randn(m, n, dtype=torch.bfloat16, device=DEVICE)
    g, h = randn(m, r, dtype=torch.bfloat16, device=DEVICE), randn(m, r, dtype=torch.bfloat16, device=DEVICE)
    one = adapters_for([r], k, n, torch.bfloat16, [0.5])
    ranks = [16, 8, 16, 4]
    ids = assign(m, 4, "skewed")
    g_multi, h_multi = per_row(ids, ranks, torch.bfloat16), per_row(ids, ranks, torch.bfloat16)
    multi = adapters_for(ranks, k, n, torch.bfloat16, [0.5, 1.0, 2.0, 0.25])
    rows = group_rows(ids.to(DEVICE), 4, DEVICE, sort=True)

    def gradients():
        return [
            *triton_backend.grad_a(x, g, one, None),
            *triton_backend.grad_b(dy, h, one, None),
            *triton_backend.grad_a(x, g_multi, multi, rows),
            *triton_backend.grad_b(dy, h_multi, multi, rows),
        ]

    with deterministic_algorithms():
        first = gradients()
        runs = [gradients() for _ in range(4)]
    assert set(modes) == {mode_value(reduce_module.PIECES)}, "M = 8192 must split into pieces on a GPU"
    for run in runs:
        for a, b in zip(first, run, strict=True):
            assert torch.equal(a, b), "deterministic dA / dB differ between runs"
    das, dbs = references(x, g, dy, h, torch.zeros(m, dtype=torch.int64), [r], [0.5])
    assert_matches_reference(first[0], das[0], torch.bfloat16, "gradients", name="dA")
    assert_matches_reference(first[1], dbs[0], torch.bfloat16, "gradients", name="dB")
    das, dbs = references(x, g_multi, dy, h_multi, ids, ranks, [0.5, 1.0, 2.0, 0.25])
    for a in range(4):
        assert_matches_reference(first[2 + a], das[a], torch.bfloat16, "gradients", name=f"dA[{a}]")
        assert_matches_reference(first[6 + a], dbs[a], torch.bfloat16, "gradients", name=f"dB[{a}]")
