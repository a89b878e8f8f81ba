"""Every candidate of every primitive of the Triton backend (fused, prepass,
splitk, composed; the reduction kernel and torch.mm) against float64, forced
with tuning.use, for one adapter and many, with and without dropout, on both
interpreter configs; and how tuning.choose decides."""

import pytest
import torch
from conftest import DEVICE
from helpers import DTYPE_PAIRS, PAIR_IDS, assert_matches_reference, f64, multi_inputs, padded, poisoned

from fused_lora import dropout_mask
from fused_lora.backends import triton_backend, tuning
from fused_lora.backends.candidates import CANDIDATES, eligible
from fused_lora.batch import Adapters, group_rows
from fused_lora.kernels.common import INTERPRETED

pytestmark = pytest.mark.skipif(not (INTERPRETED or DEVICE == "cuda"), reason="the Triton backend cannot run here")


def problem(m, k, n, ranks, dtype, adapter_dtype, multi, dropout, assignment="uniform"):
    """Inputs, Adapters, rows and the per-row dropout factors (M, K) float64."""
    inputs = multi_inputs(m, k, n, ranks, dtype, adapter_dtype, assignment=assignment, device=DEVICE)
    if not multi:
        inputs["adapter_ids"] = torch.zeros(m, dtype=torch.int64, device=DEVICE)
    p = [0.3 + 0.1 * i if dropout else 0.0 for i in range(len(ranks))]
    scalings = torch.tensor(inputs["scalings"], device=DEVICE)
    adapters = Adapters(inputs["lora_a"], inputs["lora_b"], scalings, p)
    rows = group_rows(inputs["adapter_ids"], len(ranks), DEVICE, sort=m > 16) if multi else None
    factors = torch.ones(m, k, dtype=torch.float64)
    ids = inputs["adapter_ids"].cpu()
    for a, p_a in enumerate(p):
        if p_a:
            mask = dropout_mask((m, k), p_a, 99, DEVICE).cpu().double() / (1 - p_a)
            factors[ids == a] = mask[ids == a]
    return inputs, adapters, rows, factors


def per_row(inputs, fn):
    """(M, max r) float64 rows: fn(i, a) for rows with an adapter, zeros elsewhere."""
    ranks = [a.shape[0] for a in inputs["lora_a"]]
    out = torch.zeros(inputs["x"].shape[0], max(ranks), dtype=torch.float64)
    for i, a in enumerate(inputs["adapter_ids"].tolist()):
        if a >= 0:
            out[i, : ranks[a]] = fn(i, a)
    return out


def forward_reference(inputs, factors):
    """(y, H) in float64: x W^T + b + s_a (d A_a^T) B_a^T per row, d = x * factors."""
    x, s = f64(inputs["x"]), inputs["scalings"]
    d = x * factors
    h = per_row(inputs, lambda i, a: f64(inputs["lora_a"][a]) @ d[i])
    y = x @ f64(inputs["weight"]).t() + f64(inputs["bias"])
    return y + per_row_expand(inputs, h, lambda a: s[a] * f64(inputs["lora_b"][a]).t()), h


def grad_x_reference(inputs, dy, factors):
    """(dX, G) in float64: dY W + factors * (G A_a), G = s_a dY B_a per row."""
    dy, s = f64(dy), inputs["scalings"]
    g = per_row(inputs, lambda i, a: s[a] * dy[i] @ f64(inputs["lora_b"][a]))
    return dy @ f64(inputs["weight"]) + per_row_expand(inputs, g, lambda a: f64(inputs["lora_a"][a])) * factors, g


def per_row_expand(inputs, skinny, up):
    """Row i: skinny[i, :r_a] @ up(a), float64 (zeros without an adapter)."""
    rows = []
    for i, a in enumerate(inputs["adapter_ids"].tolist()):
        u = up(max(a, 0))
        rows.append(skinny[i, : u.shape[0]] @ u if a >= 0 else torch.zeros(u.shape[1], dtype=torch.float64))
    return torch.stack(rows)


# (M, K, N, ranks): decode (M = 1, 7: splitk is a candidate), prefill-like, odd everywhere.
SHAPES = [(1, 100, 70, [5, 16]), (7, 48, 33, [1, 7]), (33, 100, 70, [16, 3]), (130, 37, 48, [4, 9])]
CASES = [
    (kind, name, multi, dropout, shape)
    for kind in ("forward", "grad_x")
    for name in CANDIDATES[kind]
    for multi in (False, True)
    for dropout in (False, True)
    for shape in SHAPES
    if not (name == "composed" and (multi or dropout)) and not (name == "splitk" and shape[0] > 16) and name != "tma"
]


@pytest.mark.parametrize(
    ("kind", "name", "multi", "dropout", "shape"),
    CASES,
    ids=[f"{k}-{n}-{'many' if mu else 'one'}-{'dropout' if d else 'p0'}-M{s[0]}" for k, n, mu, d, s in CASES],
)
def test_gemm_candidates_match_reference(kind, name, multi, dropout, shape, config):
    m, k, n, ranks = shape
    ranks = ranks if multi else ranks[:1]
    inputs, adapters, rows, factors = problem(m, k, n, ranks, torch.float32, torch.float32, multi, dropout)
    with tuning.use(**{kind: name}):
        if kind == "forward":
            out, h_out = poisoned((m, n), torch.float32, DEVICE), poisoned((m, max(ranks)), torch.float32, DEVICE)
            y, h = triton_backend.forward(padded(inputs["x"]), padded(inputs["weight"]), padded(inputs["bias"]),
                                          adapters, rows, 99, out=out, h_out=h_out)  # fmt: skip
            ref, ref_h = forward_reference(inputs, factors)
            assert y is out and h is h_out
            assert_matches_reference(y, ref, torch.float32, name="y")
            assert_matches_reference(h, ref_h, torch.float32, name="H")
        else:
            dy = torch.randn(m, n, dtype=torch.float64).to(DEVICE, torch.float32)
            out, g_out = poisoned((m, k), torch.float32, DEVICE), poisoned((m, max(ranks)), torch.float32, DEVICE)
            dx, g = triton_backend.grad_x(padded(dy), padded(inputs["weight"]), adapters, rows, 99,
                                          out=out, g_out=g_out)  # fmt: skip
            ref, ref_g = grad_x_reference(inputs, dy, factors)
            assert dx is out and g is g_out
            assert_matches_reference(dx, ref, torch.float32, "gradients", name="dX")
            assert_matches_reference(g, ref_g, torch.float32, "gradients", name="G")


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize(("kind", "name", "m"), [("forward", "prepass", 33), ("forward", "splitk", 5),
                                                 ("grad_x", "prepass", 33), ("grad_x", "splitk", 5)])  # fmt: skip
@pytest.mark.parametrize("ranks", [[16, 5], [5]], ids=["many", "one-r5"])
def test_prepass_and_splitk_in_every_dtype(kind, name, m, dtype, adapter_dtype, ranks):
    """The pre-pass shrink and the split-K sum in 16-bit and with fp32
    adapters, H and G allocated inside (rows padded to 16 bytes: r = 5)."""
    inputs, adapters, rows, factors = problem(m, 100, 70, ranks, dtype, adapter_dtype, len(ranks) > 1, False)
    with tuning.use(**{kind: name}):
        if kind == "forward":
            y, h = triton_backend.forward(inputs["x"], inputs["weight"], inputs["bias"], adapters, rows)
            ref, ref_h = forward_reference(inputs, factors)
            assert_matches_reference(y, ref, dtype, name=f"{name} y")
            assert_matches_reference(h, ref_h, adapter_dtype, name=f"{name} H")
        else:
            dy = torch.randn(m, 70, dtype=torch.float64).to(DEVICE, dtype)
            dx, g = triton_backend.grad_x(dy, inputs["weight"], adapters, rows)
            ref, ref_g = grad_x_reference(inputs, dy, factors)
            assert_matches_reference(dx, ref, dtype, "gradients", name=f"{name} dX")
            assert_matches_reference(g, ref_g, adapter_dtype, "gradients", name=f"{name} G")


@pytest.mark.parametrize(("dtype", "shape"), [(torch.bfloat16, (70, 48, 40)), (torch.float16, (33, 64, 24)),
                                             (torch.bfloat16, (1, 16, 136))], ids=str)  # fmt: skip
@pytest.mark.parametrize("dropout", [False, True], ids=["p0", "dropout"])
def test_tma_candidate(dtype, shape, dropout, config):
    """The persistent TMA GEMM (x and W through tensor descriptors, odd M, K
    and N multiples of 8 as TMA needs) after the shrink pre-pass, forward and
    dX (dX only without dropout: the candidate is not eligible there)."""
    m, k, n = shape
    inputs, adapters, rows, factors = problem(m, k, n, [5], dtype, dtype, False, dropout)
    call = triton_backend._call(inputs["x"], inputs["weight"], inputs["bias"], adapters, rows, 0)
    assert "tma" in eligible("forward", call, m)
    with tuning.use(forward="tma", grad_x="tma"):
        out = poisoned((m, n), dtype, DEVICE)
        y, h = triton_backend.forward(inputs["x"], inputs["weight"], inputs["bias"], adapters, rows, 99, out=out)
        ref, ref_h = forward_reference(inputs, factors)
        assert y is out
        assert_matches_reference(y, ref, dtype, name="y")
        assert_matches_reference(h, ref_h, dtype, name="H")
        dy = torch.randn(m, n, dtype=torch.float64).to(DEVICE, dtype)
        call = triton_backend._call(dy, inputs["weight"], None, adapters, rows, 0)
        assert ("tma" in eligible("grad_x", call, m)) == (not dropout)
        dx, g = triton_backend.grad_x(dy, inputs["weight"], adapters, rows, 99)
        ref, ref_g = grad_x_reference(inputs, dy, factors)
        assert_matches_reference(dx, ref, dtype, "gradients", name="dX")
        assert_matches_reference(g, ref_g, dtype, "gradients", name="G")


def test_tma_needs_aligned_16bit_operands():
    """TMA reads 16-byte-aligned rows: K = 37 in bf16 (74-byte rows), fp32
    operands, many adapters and a quantized base are not eligible."""
    for args, kwargs in [((300, 37, 40, 8, torch.bfloat16), {}), ((300, 48, 40, 8, torch.float32), {}),
                         ((300, 48, 40, 8, torch.bfloat16), {"multi": True})]:  # fmt: skip
        call = fake_call(*args, **kwargs)
        assert "tma" not in eligible("forward", call, 300), (args, kwargs)
    call = fake_call(300, 48, 40, 8, torch.bfloat16, torch.float32)
    assert "tma" not in eligible("forward", call, 300), "fp32 adapters on bf16 x"


@pytest.mark.parametrize(("name", "dropout"), [("kernel", False), ("kernel", True), ("composed", False)])
def test_reduce_candidates_match_reference(name, dropout, config):
    """(torch.mm is a candidate only without dropout.)"""
    m, k, n, r = 70, 48, 33, 5
    inputs, adapters, _, factors = problem(m, k, n, [r], torch.float32, torch.float32, False, dropout)
    g = torch.randn(m, r, dtype=torch.float64).to(DEVICE, torch.float32)
    dy = torch.randn(m, n, dtype=torch.float64).to(DEVICE, torch.float32)
    with tuning.use(reduce=name):
        (da,) = triton_backend.grad_a(padded(inputs["x"]), padded(g), adapters, None, 99,
                                      out=poisoned((r, k), torch.float32, DEVICE))  # fmt: skip
        (db,) = triton_backend.grad_b(
            padded(dy), padded(g), adapters, None, out=poisoned((n, r), torch.float32, DEVICE)
        )
    assert_matches_reference(da, f64(g).t() @ (f64(inputs["x"]) * factors), torch.float32, "gradients", name="dA")
    s = inputs["scalings"][0]
    assert_matches_reference(db, s * f64(dy).t() @ f64(g), torch.float32, "gradients", name="dB")


# ---- the choice ----------------------------------------------------------------


def fake_call(m, k, n, r, dtype=torch.float32, adapter_dtype=None, multi=False, dropout=False):
    inputs, adapters, rows, _ = problem(
        m, k, n, [r, 2] if multi else [r], dtype, adapter_dtype or dtype, multi, dropout
    )
    return triton_backend._call(inputs["x"], inputs["weight"], inputs["bias"], adapters, rows, 0)


@pytest.mark.parametrize(
    ("kind", "shape", "options", "expected"),
    [
        ("forward", (1, 1024, 1024), {}, "splitk"),  # decode, W of 2^20 elements: every SM reads a share
        ("forward", (1, 64, 64), {}, "fused"),  # decode, small W: one launch
        ("forward", (300, 64, 64), {}, "prepass"),  # interpreted: never cuBLAS
        ("forward", (300, 64, 64), {"dropout": True}, "prepass"),
        ("forward", (300, 64, 64), {"multi": True}, "prepass"),
        ("forward", (100, 64, 64), {}, "fused"),
        ("grad_x", (16, 1024, 1024), {}, "splitk"),
        ("reduce", (300, 64, 64), {}, "kernel"),
    ],
)
def test_heuristic(kind, shape, options, expected):
    m, k, n = shape
    call = fake_call(m, k, n, 8, **options)
    assert tuning.heuristic(kind, call, m, eligible(kind, call, m)) == expected


def test_composed_is_eligible_for_one_adapter_without_dropout_only():
    assert "composed" in eligible("forward", fake_call(300, 64, 64, 8), 300)
    assert "composed" not in eligible("forward", fake_call(300, 64, 64, 8, dropout=True), 300)
    assert "composed" not in eligible("forward", fake_call(300, 64, 64, 8, multi=True), 300)
    assert "splitk" not in eligible("forward", fake_call(17, 64, 64, 8), 17)


def test_use_and_environment_force_a_candidate(monkeypatch):
    call = fake_call(300, 64, 64, 8)
    with tuning.use(forward="fused"):
        assert tuning.choose("forward", call, 300, None) == "fused"
    monkeypatch.setenv("FUSED_LORA_CANDIDATES", "forward=composed,reduce=kernel")
    assert tuning.choose("forward", call, 300, None) == "composed"
    monkeypatch.setenv("FUSED_LORA_CANDIDATES", "forward=cublas")
    with pytest.raises(ValueError, match="FUSED_LORA_CANDIDATES"):
        tuning.choose("forward", call, 300, None)
    with pytest.raises(ValueError, match="FUSED_LORA_CANDIDATES"), tuning.use(grad_x="nope"):
        pass


def test_key_names_every_dimension_of_the_choice():
    key = tuning.key("forward", fake_call(300, 64, 48, 5, torch.bfloat16, torch.float32, dropout=True), 300)
    assert key == "forward|512|48|64|16|bfloat16|float32|one|dropout|bias"
