"""The torch.library custom ops (fused_lora::lora_forward, lora_grad_x,
lora_grad_g, lora_grad_a, lora_grad_b): `torch.library.opcheck` (schema,
autograd registration, fake tensors, AOT dispatch with dynamic shapes, which
also compares the registered backward with eager) for every op, for one
adapter (lists of one, no rows) and for many (rows from batch.group_rows,
sorted or not), on both backends; the custom op route against the eager
LoRAFunction route; and the op through autograd against the float64
references."""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_matches_reference, lora_inputs, multi_inputs, randn

from fused_lora import ops
from fused_lora.batch import Rows, group_rows
from fused_lora.reference import lora_linear_reference, multi_lora_reference

CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16-fp32A": (torch.bfloat16, torch.float32),
}
RANKS = [3, 1, 5]

# (M, dropout_p per adapter, bias, rows): "one" = one adapter (rows None),
# "sorted" = rows grouped by group_rows, "unsorted" = ids only (M <= 16).
CASES = {
    "one": (5, [0.0], True, "one"),
    "one-dropout-nobias": (7, [0.3], False, "one"),
    "one-M=0": (0, [0.0], True, "one"),
    "many-sorted": (20, [0.0, 0.0, 0.0], True, "sorted"),
    "many-sorted-dropout-nobias": (20, [0.3, 0.0, 0.5], False, "sorted"),
    "many-unsorted": (9, [0.2, 0.2, 0.2], True, "unsorted"),
    "many-M=0": (0, [0.0, 0.0, 0.0], True, "sorted"),
}


def caller_ids(m):
    """Each row's adapter, in the caller's order: adapter 1 has no rows,
    some rows are base only (-1)."""
    return torch.tensor([0, 2, -1, 2, 0] * (m // 5 + 1), dtype=torch.int64)[:m]


def rows_for(kind, m, n):
    """(ids, order, starts) as the functional API passes them."""
    if kind == "one":
        return None, None, None
    rows = group_rows(caller_ids(m), n, DEVICE, sort=kind == "sorted")
    return rows.ids, rows.order, rows.starts


# A dense base weight: no quantization spec, no parts.
DENSE = ("dense", [])


def op_inputs(case, dtypes, requires_grad=("x", "lora_a", "lora_b")):
    """The arguments of lora_forward for a case, tensors on DEVICE."""
    m, dropout_p, bias, kind = CASES[case]
    dtype, adapter_dtype = DTYPES[dtypes]
    ranks = RANKS[: len(dropout_p)]
    t = multi_inputs(m, 16, 12, ranks, dtype, adapter_dtype, bias=bias, device=DEVICE)
    for name in requires_grad:
        if name in ("lora_a", "lora_b"):
            for a in t[name]:
                a.requires_grad_()
        elif t[name] is not None:
            t[name].requires_grad_()
    scalings = torch.tensor(t["scalings"], dtype=torch.float32, device=DEVICE)
    seed = torch.tensor(1234) if any(p > 0 for p in dropout_p) else None
    ids, order, starts = rows_for(kind, m, len(ranks))
    return t, (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scalings, dropout_p, seed, ids, order, starts)


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_opcheck_forward(backend, dtypes, case):
    _, args = op_inputs(case, dtypes)
    torch.library.opcheck(ops.lora_forward, (*args, backend, *DENSE, None, False), test_utils=CHECKS)


@pytest.mark.parametrize("case", ["one", "many-sorted"])
def test_opcheck_forward_every_gradient(backend, case):
    _, args = op_inputs(case, "fp32", requires_grad=("x", "weight", "bias", "lora_a", "lora_b"))
    torch.library.opcheck(ops.lora_forward, (*args, backend, *DENSE, None, False), test_utils=CHECKS)


@pytest.mark.parametrize("case", ["one", "many-sorted"])
def test_opcheck_forward_frozen_adapters(backend, case):
    """Only x requires grad (a frozen layer's input gradient)."""
    _, args = op_inputs(case, "fp32", requires_grad=("x",))
    torch.library.opcheck(ops.lora_forward, (*args, backend, *DENSE, None, False), test_utils=CHECKS)


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", ["one-dropout-nobias", "many-sorted-dropout-nobias", "many-unsorted"])
def test_opcheck_backward_ops(backend, dtypes, case):
    _, args = op_inputs(case, dtypes, requires_grad=())
    x, w, _, a, b, s, p, seed, ids, order, starts = args
    dtype, adapter_dtype = DTYPES[dtypes]
    m, width = x.shape[0], max(t.shape[0] for t in a)
    dy = randn(m, 12, dtype=dtype, device=DEVICE)
    g = randn(m, width, dtype=adapter_dtype, device=DEVICE)
    h = randn(m, width, dtype=adapter_dtype, device=DEVICE)
    rows = (ids, order, starts)
    for op, op_args in (
        (ops.lora_grad_x, (dy, w, a, b, s, p, seed, *rows, backend, *DENSE)),
        (ops.lora_grad_x, (dy, w, a, b, s, [0.0] * len(a), None, *rows, backend, *DENSE)),
        (ops.lora_grad_g, (dy, w, a, b, s, *rows, backend, *DENSE)),
        (ops.lora_grad_a, (x, g, a, b, s, p, seed, *rows, backend)),
        (ops.lora_grad_b, (dy, h, a, b, s, *rows, backend)),
    ):
        torch.library.opcheck(op, op_args, test_utils=CHECKS)


# ---- the op against the eager route and the references ---------------------------


def _leaves(t):
    out = dict(t)
    for name in ("x", "weight", "bias"):
        out[name] = None if t[name] is None else t[name].detach().clone().requires_grad_()
    for name in ("lora_a", "lora_b"):
        out[name] = [a.detach().clone().requires_grad_() for a in t[name]]
    return out


def _run(route, t, args, backend):
    """y, H and every gradient of one route, with a fixed upstream gradient."""
    leaves = _leaves(t)
    x, w, bias, a, b = (leaves[n] for n in ("x", "weight", "bias", "lora_a", "lora_b"))
    s, p, seed, ids, order, starts = args[5:]
    if route == "op":
        y, h, _ = ops.lora_forward(x, w, bias, a, b, s, p, seed, ids, order, starts, backend, *DENSE, None, False)
    else:
        plan = ops.Plan(p, seed, ids, order, starts, backend, "dense", False, None)
        y, h = ops.LoRAFunction.apply(plan, x, w, bias, s, None, *a, *b)
    assert not h.requires_grad, "H is for the backward only"
    dy = (torch.arange(y.numel(), dtype=torch.float64).reshape(y.shape) % 7 - 3).to(y)
    y.backward(dy)
    grads = [leaves[n].grad for n in ("x", "weight", "bias") if leaves[n] is not None]
    return [y, h, *grads], [t.grad for t in (*a, *b)]


@pytest.mark.parametrize("case", ["one", "one-dropout-nobias", "many-sorted-dropout-nobias", "many-unsorted"])
def test_op_and_eager_route_agree(backend, case):
    """The custom op (compiled route) and LoRAFunction (eager route) give the
    same y, H and gradients: they share one implementation. The eager route
    gives None to an adapter without rows (adapter 1 here, found from the
    rows when `present` is None), the op zeros."""
    t, args = op_inputs(case, "fp32")
    op_out, op_adapters = _run("op", t, args, backend)
    eager_out, eager_adapters = _run("eager", t, args, backend)
    for got, want in zip(op_out, eager_out, strict=True):
        torch.testing.assert_close(got, want)  # GPU atomics may reorder the dA, dB sums
    n = len(t["lora_a"])
    for i, (got, want) in enumerate(zip(op_adapters, eager_adapters, strict=True)):
        if n > 1 and i % n == 1:
            assert want is None, "the eager route: no rows, no gradient"
            assert not got.any(), "the op: zeros"
        else:
            torch.testing.assert_close(got, want)


def test_eager_route_present_decides_none():
    """`present` given: exactly the adapters marked absent get None."""
    t, args = op_inputs("many-sorted", "fp32")
    leaves = _leaves(t)
    s, p, seed, ids, order, starts = args[5:]
    present = [True, False, False]
    plan = ops.Plan(p, seed, ids, order, starts, "torch", "dense", False, present)
    y, _ = ops.LoRAFunction.apply(plan, leaves["x"], leaves["weight"], leaves["bias"], s, None,
                                     *leaves["lora_a"], *leaves["lora_b"])  # fmt: skip
    y.sum().backward()
    assert [a.grad is None for a in leaves["lora_a"]] == [False, True, True]
    assert Rows(ids, order, starts).present(3) == [True, False, True]


@pytest.mark.parametrize("case", ["one", "one-M=0", "many-sorted", "many-unsorted"])
def test_op_matches_reference(backend, case):
    """The op alone, through autograd, against the float64 reference."""
    m, kind = CASES[case][0], CASES[case][3]
    t, args = op_inputs(case, "fp32", requires_grad=())
    ours = _leaves(t)
    s, _, _, ids, order, starts = args[5:]
    x, w, bias, a, b = (ours[n] for n in ("x", "weight", "bias", "lora_a", "lora_b"))
    y, h, _ = ops.lora_forward(x, w, bias, a, b, s, [0.0] * len(a), None, ids, order, starts, backend, *DENSE, None,
                               False)  # fmt: skip
    ref = {n: v.detach().double().cpu().requires_grad_() for n, v in t.items() if n in ("x", "weight", "bias")}
    ref_a = [v.detach().double().cpu().requires_grad_() for v in t["lora_a"]]
    ref_b = [v.detach().double().cpu().requires_grad_() for v in t["lora_b"]]
    if kind == "one":
        ref_y = lora_linear_reference(*ref.values(), ref_a[0], ref_b[0], t["scalings"][0])
        ref_h = ref["x"] @ ref_a[0].t()
    else:
        ids = caller_ids(m)
        ref_y = multi_lora_reference(*ref.values(), ref_a, ref_b, t["scalings"], ids)
        ref_h = torch.zeros(m, max(r.shape[0] for r in a), dtype=torch.float64)
        for i, adapter in enumerate(ids.tolist()):
            if adapter >= 0:
                ref_h[i, : a[adapter].shape[0]] = ref["x"][i].detach() @ ref_a[adapter].detach().t()
    assert_matches_reference(y, ref_y, torch.float32, name="y")
    assert_matches_reference(h, ref_h, torch.float32, name="H")
    dy = randn(*y.shape, device=DEVICE)
    y.backward(dy)
    ref_y.backward(dy.double().cpu())
    for name in ("x", "weight", "bias"):
        assert_matches_reference(ours[name].grad, ref[name].grad, torch.float32, "gradients", name=f"d{name}")
    for name, got, want in (("lora_a", a, ref_a), ("lora_b", b, ref_b)):
        for i, (g, r) in enumerate(zip(got, want, strict=True)):
            expected = torch.zeros_like(g, dtype=torch.float64) if r.grad is None else r.grad
            assert_matches_reference(g.grad, expected, torch.float32, "gradients", name=f"d{name}[{i}]")


def test_op_dropout_is_a_function_of_the_seed(backend):
    """A seed tensor makes the op deterministic: two calls, one result."""
    t = lora_inputs(9, 16, 12, 3, torch.float32, device=DEVICE)
    s = torch.tensor([0.5], device=DEVICE)
    args = (t["x"], t["weight"], t["bias"], [t["lora_a"]], [t["lora_b"]], s, [0.4], torch.tensor(77), None, None, None)
    first, _, _ = ops.lora_forward(*args, backend, *DENSE, None, False)
    second, _, _ = ops.lora_forward(*args, backend, *DENSE, None, False)
    other, _, _ = ops.lora_forward(*args[:7], torch.tensor(78), None, None, None, backend, *DENSE, None, False)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.allclose(first, other, atol=1e-4)
