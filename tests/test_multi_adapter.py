"""multi_lora_linear and MultiLoRALinear end to end, on both backends: the
output and every gradient against a float64 per-adapter loop, shapes,
assignments, gradcheck, input checks, and the layer's adapter management."""

import math

import pytest
import torch
from conftest import DEVICE
from helpers import assert_matches_reference, lora_inputs
from test_forward import DTYPE_PAIRS, PAIR_IDS
from test_multi_kernels import assign, multi_inputs
from torch import nn

import fused_lora
from fused_lora import MultiLoRALinear, multi_lora_linear, multi_torch_backend, multi_triton_backend
from fused_lora.kernels.common import INTERPRETED
from fused_lora.multi_reference import multi_lora_reference

BASE = ("x", "weight", "bias")
GRAD_SETS = {
    "x+A+B": {"x", "lora_a", "lora_b"},
    "A+B": {"lora_a", "lora_b"},
    "x": {"x"},
    "all": {*BASE, "lora_a", "lora_b"},
}


def leaves(inputs, requires_grad, to_f64=False):
    """Fresh leaf copies of the inputs (float64 CPU ones for the reference);
    lora_a / lora_b are lists of leaves."""

    def leaf(t, name):
        t = t.detach().to("cpu", torch.float64) if to_f64 else t.detach().clone()
        return t.requires_grad_(name in requires_grad)

    out = dict(inputs)
    for name in BASE:
        out[name] = None if inputs[name] is None else leaf(inputs[name], name)
    for name in ("lora_a", "lora_b"):
        out[name] = [leaf(t, name) for t in inputs[name]]
    return out


def check_layer(inputs, requires_grad, x_view=None):
    """Run multi_lora_linear and the float64 loop on the same inputs and the
    same upstream gradient; compare y and every requested gradient. An
    adapter with no rows must get no gradient at all (None), as in PEFT."""
    dtype = inputs["x"].dtype
    adapter_dtype = inputs["lora_a"][0].dtype if inputs["lora_a"] else dtype
    ours, ref = leaves(inputs, requires_grad), leaves(inputs, requires_grad, to_f64=True)
    view = x_view or (lambda t: t)
    y = multi_lora_linear(view(ours["x"]), *[ours[n] for n in list(inputs)[1:]])
    ref_y = multi_lora_reference(view(ref["x"]), *[ref[n] for n in list(inputs)[1:]])
    assert y.dtype == dtype and y.device.type == DEVICE
    assert_matches_reference(y, ref_y, dtype, name="y")
    if not requires_grad:
        return
    dy = torch.randn(y.shape, dtype=torch.float64).to(y.device, y.dtype)
    y.backward(dy)
    ref_y.backward(dy.double().cpu())
    for name in BASE:
        if ours[name] is not None:
            grad, ref_grad = ours[name].grad, ref[name].grad
            if name in requires_grad:
                assert_matches_reference(grad, ref_grad, dtype, "gradients", name=f"d{name}")
            else:
                assert grad is None
    ids = inputs["adapter_ids"]
    lead = view(inputs["x"]).shape[:-1]
    per_row = ids.reshape((*ids.shape, *[1] * (len(lead) - ids.dim()))).expand(lead)
    used = set(per_row.flatten().tolist())
    for name in ("lora_a", "lora_b"):
        for a, (leaf, ref_leaf) in enumerate(zip(ours[name], ref[name], strict=True)):
            if name not in requires_grad or a not in used:
                assert leaf.grad is None, f"{name}[{a}] needs no gradient"
                continue
            assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape
            assert_matches_reference(leaf.grad, ref_leaf.grad, adapter_dtype, "gradients", name=f"d{name}[{a}]")


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("grads", GRAD_SETS, ids=str)
def test_gradients_match_reference(backend, dtype, adapter_dtype, grads):
    inputs = multi_inputs(33, 100, 70, [5, 16, 1, 9], dtype, adapter_dtype, "uniform")
    check_layer(inputs, GRAD_SETS[grads])


# (leading dims of x, K, N, ranks, assignment, ids per row or per batch entry)
SHAPES = [
    ((0,), 48, 16, [4, 2], "uniform", "row"),
    ((1,), 16, 33, [1], "one", "row"),
    ((), 20, 12, [3, 2], "one", "row"),  # a 1-D x: one row, a 0-d adapter_ids
    ((2, 3, 7), 48, 100, [16, 3], "uniform", "row"),
    ((5, 9), 48, 40, [2, 8, 4], "uniform", "batch"),
    ((4, 0, 5), 16, 16, [2], "uniform", "batch"),
    ((70,), 37, 20, [1, 2, 3], "skewed", "row"),
]


@pytest.mark.parametrize(("lead", "k", "n", "ranks", "assignment", "per"), SHAPES, ids=str)
def test_shapes(backend, lead, k, n, ranks, assignment, per):
    inputs = multi_inputs(1, k, n, ranks, torch.float32, assignment=assignment)
    inputs["x"] = torch.randn(*lead, k, device=DEVICE)
    id_shape = lead if per == "row" else lead[:1]
    inputs["adapter_ids"] = assign(math.prod(id_shape), len(ranks), assignment).reshape(id_shape).to(DEVICE)
    check_layer(inputs, GRAD_SETS["x+A+B"])


@pytest.mark.parametrize("assignment", ["uniform", "skewed", "one", "base"])
def test_assignments(backend, assignment):
    """Every adapter and -1 alike; 80% on one adapter; all on one adapter
    (the others get no gradient); no adapter at all (y is the base layer)."""
    inputs = multi_inputs(40, 48, 33, [4, 8, 2, 16], torch.bfloat16, torch.float32, assignment)
    check_layer(inputs, GRAD_SETS["x+A+B"])


def test_no_adapters(backend):
    inputs = multi_inputs(9, 16, 12, [], torch.float32)
    check_layer(inputs, GRAD_SETS["all"])


@pytest.mark.slow
@pytest.mark.parametrize("assignment", ["uniform", "skewed"])
def test_64_adapters(backend, assignment):
    """64 adapters, ranks 1..64, 150 rows: most tiles hold many adapters."""
    inputs = multi_inputs(150, 40, 24, list(range(1, 65)), torch.float32, assignment=assignment)
    check_layer(inputs, GRAD_SETS["x+A+B"])


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS[:3] + DTYPE_PAIRS[3:4], ids=PAIR_IDS[:4])
def test_non_contiguous_inputs(backend, dtype, adapter_dtype):
    """x as a transposed view, W and an adapter as slices of larger matrices
    (the kernels copy a non-contiguous adapter; x and W are read in place)."""
    inputs = multi_inputs(21, 48, 33, [4, 6], dtype, adapter_dtype)
    inputs["x"] = torch.randn(7, 3, 48, dtype=torch.float64).to(DEVICE, dtype)
    inputs["adapter_ids"] = inputs["adapter_ids"].reshape(3, 7)
    inputs["weight"] = (torch.randn(40, 60, dtype=torch.float64) * 48**-0.5).to(DEVICE, dtype)[2:35, 5:53]
    inputs["lora_a"][1] = (torch.randn(6, 50, dtype=torch.float64) * 48**-0.5).to(DEVICE, adapter_dtype)[:, 1:49]
    check_layer(inputs, GRAD_SETS["all"], x_view=lambda x: x.transpose(0, 1))


def test_one_adapter_matches_single_adapter_layer(backend):
    """Every row on one adapter: the same result as lora_linear."""
    inputs = lora_inputs(33, 48, 40, 5, torch.float32, device=DEVICE)
    ids = torch.zeros(33, dtype=torch.int64, device=DEVICE)
    single = fused_lora.lora_linear(*inputs.values(), 0.7)
    multi = multi_lora_linear(
        inputs["x"], inputs["weight"], inputs["bias"], [inputs["lora_a"]], [inputs["lora_b"]], [0.7], ids
    )
    torch.testing.assert_close(multi, single, rtol=1e-5, atol=1e-5)


def test_row_order_is_the_callers(backend):
    """Permuting the rows of x and adapter_ids together permutes y the same
    way: the internal grouping by adapter never shows."""
    inputs = multi_inputs(40, 32, 24, [4, 8, 2], torch.float32)
    args = [inputs[n] for n in ("weight", "bias", "lora_a", "lora_b", "scalings")]
    perm = torch.randperm(40, device=DEVICE)
    y = multi_lora_linear(inputs["x"], *args, inputs["adapter_ids"])
    y_perm = multi_lora_linear(inputs["x"][perm], *args, inputs["adapter_ids"][perm])
    torch.testing.assert_close(y_perm, y[perm], rtol=1e-6, atol=1e-6)


def test_float64(backend):
    if backend == "triton" and not INTERPRETED:
        pytest.skip("float64 runs on the torch backend only on a GPU")
    inputs = multi_inputs(17, 20, 12, [3, 1, 5], torch.float64)
    check_layer(inputs, GRAD_SETS["all"])


def _gradcheck_inputs():
    inputs = multi_inputs(8, 10, 7, [3, 1], torch.float64, assignment="uniform")
    inputs["adapter_ids"] = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1], device=DEVICE)
    tensors = [inputs["x"], inputs["weight"], inputs["bias"], *inputs["lora_a"], *inputs["lora_b"]]
    for t in tensors:
        t.requires_grad_()

    def f(x, weight, bias, a0, a1, b0, b1):
        return multi_lora_linear(x, weight, bias, [a0, a1], [b0, b1], inputs["scalings"], inputs["adapter_ids"])

    return f, tuple(tensors)


def test_gradcheck_torch_backend():
    f, tensors = _gradcheck_inputs()
    with fused_lora.set_backend("torch"):
        assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.skipif(not INTERPRETED, reason="float64 Triton kernels run only interpreted")
def test_gradcheck_triton_interpreted():
    f, tensors = _gradcheck_inputs()
    with fused_lora.set_backend("triton"):  # fast_mode: a full gradcheck interprets too many launches
        assert torch.autograd.gradcheck(f, tensors, fast_mode=True)


def test_cpu_adapter_ids_with_device_x(backend):
    """adapter_ids may stay on the CPU (no device sync to check them)."""
    inputs = multi_inputs(12, 16, 8, [2, 3], torch.float32)
    inputs["adapter_ids"] = inputs["adapter_ids"].cpu()
    check_layer(inputs, GRAD_SETS["x+A+B"])


# ---- bad inputs: one test per error, raised before any kernel runs ----------


def good(**changes):
    args = multi_inputs(3, 8, 6, [2, 3], torch.float32)
    args.update(changes)
    return args


BAD_INPUTS = {
    "x not a tensor": (dict(x=[[1.0] * 8]), TypeError, "x must be a torch.Tensor"),
    "wrong K": (dict(x=torch.randn(3, 9)), ValueError, r"x must have shape \(\.\.\., 8\)"),
    "1-d weight": (dict(weight=torch.randn(8)), ValueError, "weight must be 2-D"),
    "bias wrong N": (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
    "lora_a a tensor": (dict(lora_a=torch.randn(2, 8)), TypeError, "lora_a must be a list or tuple"),
    "lora_b too short": (dict(lora_b=[torch.randn(6, 2)]), ValueError, r"lora_b must have one entry per adapter \(2"),
    "scalings too long": (dict(scalings=[1.0, 2.0, 3.0]), ValueError, "scalings must have one entry per adapter"),
    "scaling a tensor": (dict(scalings=[1.0, torch.tensor(2.0)]), TypeError, r"scalings\[1\] must be a Python float"),
    "lora_a entry not a tensor": (dict(lora_a=[torch.randn(2, 8), None]), TypeError, r"lora_a\[1\] must be a torch"),
    "lora_a wrong K": (
        dict(lora_a=[torch.randn(2, 8), torch.randn(3, 7)]),
        ValueError,
        r"lora_a\[1\] must have shape \(r, 8\)",
    ),
    "rank 0": (
        dict(lora_a=[torch.randn(2, 8), torch.randn(0, 8)], lora_b=[torch.randn(6, 2), torch.randn(6, 0)]),
        ValueError,
        r"lora_a\[1\] must have shape \(r, 8\) with r >= 1",
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
    "adapter_ids a list": (dict(adapter_ids=[0, 1, 0]), TypeError, "adapter_ids must be a torch.Tensor"),
    "float adapter_ids": (dict(adapter_ids=torch.zeros(3)), TypeError, "adapter_ids must be an integer tensor"),
    "bool adapter_ids": (dict(adapter_ids=torch.zeros(3, dtype=torch.bool)), TypeError, "must be an integer tensor"),
    "adapter_ids wrong shape": (
        dict(adapter_ids=torch.zeros(4, dtype=torch.int64)),
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
    "adapter_ids below -1": (dict(adapter_ids=torch.tensor([0, -2, 1])), ValueError, r"got values in \[-2, 1\]"),
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

    args = good(**{k: to_device(v) for k, v in changes.items()})

    def no_kernel(*_, **__):
        raise AssertionError("a kernel ran before the input check")

    for module in (multi_torch_backend, multi_triton_backend):
        monkeypatch.setattr(module, "forward", no_kernel)
    with pytest.raises(error, match=message):
        multi_lora_linear(**args)


# ---- MultiLoRALinear ----------------------------------------------------------


def make_layer(ranks=(4, 8), dtype=None, bias=True, lora_dtype=None):
    layer = MultiLoRALinear(20, 12, bias, DEVICE, dtype)
    for i, r in enumerate(ranks):
        layer.add_adapter(f"task{i}", r, 2 * r, init_lora_weights=False, lora_dtype=lora_dtype)
    return layer


def test_parameters_named_like_peft():
    layer = make_layer()
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "weight": (12, 20),
        "bias": (12,),
        "lora_A.task0.weight": (4, 20),
        "lora_B.task0.weight": (12, 4),
        "lora_A.task1.weight": (8, 20),
        "lora_B.task1.weight": (12, 8),
    }
    assert {name for name, p in layer.named_parameters() if p.requires_grad} == {
        n for n in shapes if n.startswith("lora_")
    }
    assert layer.adapter_names == ["task0", "task1"]
    assert layer.r == {"task0": 4, "task1": 8} and layer.scaling == {"task0": 2.0, "task1": 2.0}


def test_from_linear_shares_weights_and_new_adapters_start_at_base():
    linear = nn.Linear(20, 12, device=DEVICE)
    layer = MultiLoRALinear.from_linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias and not linear.weight.requires_grad
    layer.add_adapter("a", 4, 8)
    layer.add_adapter("b", 2, 2, use_rslora=True, init_lora_weights="gaussian")
    assert layer.scaling["b"] == pytest.approx(2 / 2**0.5)
    assert not layer.lora_B["a"].weight.any() and not layer.lora_B["b"].weight.any()
    x = torch.randn(3, 5, 20, device=DEVICE)
    torch.testing.assert_close(layer(x, torch.tensor([0, 1, -1])), linear(x), rtol=1e-5, atol=1e-5)


def test_layer_forward_matches_reference_and_trains(backend):
    """ids of the batch dimension and PEFT's adapter_names give the same
    result, the float64 loop's; only the adapters used get gradients."""
    layer = make_layer(ranks=(4, 8, 2))
    x = torch.randn(4, 5, 20, device=DEVICE)
    names = ["task2", "__base__", "task0", "task2"]
    y = layer(x, adapter_names=names)
    by_ids = layer(x, torch.tensor([2, -1, 0, 2], device=DEVICE))
    torch.testing.assert_close(y, by_ids, rtol=0, atol=0)
    ref = multi_lora_reference(
        x,
        layer.weight,
        layer.bias,
        [layer.lora_A[n].weight for n in layer.adapter_names],
        [layer.lora_B[n].weight for n in layer.adapter_names],
        [layer.scaling[n] for n in layer.adapter_names],
        torch.tensor([2, -1, 0, 2]),
    )
    assert_matches_reference(y, ref, torch.float32, name="y")
    y.square().mean().backward()
    assert layer.lora_A["task0"].weight.grad is not None and layer.lora_B["task2"].weight.grad is not None
    assert layer.lora_A["task1"].weight.grad is None, "an adapter with no rows gets no gradient"
    assert layer.weight.grad is None


def test_fp32_adapters_on_bf16_layer(backend):
    layer = make_layer(dtype=torch.bfloat16, lora_dtype=torch.float32)
    x = torch.randn(6, 20, device=DEVICE, dtype=torch.bfloat16)
    y = layer(x, torch.tensor([0, 1, 1, -1, 0, 1], device=DEVICE))
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="share one dtype"):
        layer.add_adapter("half", 2, lora_dtype=torch.bfloat16)


def test_remove_adapter_shifts_indices():
    layer = make_layer(ranks=(4, 8, 2))
    x = torch.randn(2, 20, device=DEVICE)
    before = layer(x, adapter_names=["task2", "task2"])
    layer.remove_adapter("task1")
    assert layer.adapter_names == ["task0", "task2"]
    assert "lora_A.task1.weight" not in layer.state_dict() and "task1" not in layer.scaling
    torch.testing.assert_close(layer(x, torch.tensor([1, 1], device=DEVICE)), before)
    with pytest.raises(KeyError, match="no adapter 'task1'"):
        layer.remove_adapter("task1")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(name="task0"), ValueError, "exists already"),
        (dict(name="a.b"), ValueError, "adapter name must be a non-empty str"),
        (dict(name="__base__"), ValueError, "adapter name must be"),
        (dict(name="new", r=0), ValueError, "r must be a positive integer"),
        (dict(name="new", init_lora_weights="pissa"), ValueError, "init_lora_weights must be"),
    ],
    ids=["duplicate", "dot", "base", "r=0", "init"],
)
def test_bad_add_adapter(kwargs, error, message):
    with pytest.raises(error, match=message):
        make_layer().add_adapter(**kwargs)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda layer, x: layer(x), ValueError, "exactly one of adapter_ids and adapter_names"),
        (lambda layer, x: layer(x, torch.zeros(3), adapter_names=["task0"] * 3), ValueError, "exactly one"),
        (lambda layer, x: layer(x, adapter_names=["task0", "nope", "task1"]), ValueError, r"adapter_names\[1\]"),
        (lambda layer, x: layer(x, adapter_names="task0"), TypeError, "adapter_names must be a list of str"),
        (lambda layer, x: layer(x, adapter_names=["task0"]), ValueError, "adapter_ids must have x's leading shape"),
    ],
    ids=["neither", "both", "unknown name", "a str", "too few names"],
)
def test_bad_forward(call, error, message):
    with pytest.raises(error, match=message):
        call(make_layer(), torch.randn(3, 20, device=DEVICE))


def test_extra_repr_lists_adapters():
    assert "task1: r=8, scaling=2" in repr(make_layer())
