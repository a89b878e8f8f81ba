"""LoRALinear and MultiLoRALinear as modules: PEFT's parameter names and
shapes, construction and its checks, from_linear, outputs and gradients
against float64 references on both backends, fp32 adapters on bf16 layers,
training, merge / unmerge, the scaling buffer across dtype changes, meta
tensors; for many adapters also adapter management, per-adapter dropout,
active_adapter, and fused_lora.adapter_names over a whole model."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import assert_matches_reference, f64, tolerance
from torch import nn

import fused_lora
from fused_lora import LoRALinear, MultiLoRALinear, lora_linear, lora_scaling
from fused_lora.kernels.common import INTERPRETED
from fused_lora.reference import lora_linear_reference, multi_lora_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def skip_if_no_float64(backend):
    """float64 runs on the Triton backend only in the interpreter."""
    if backend == "triton" and not INTERPRETED:
        pytest.skip("float64 runs on the torch backend only on a GPU")


def randomize_b(layer, names=None):
    """A trained-looking adapter: B random, not the zero a fresh adapter starts with."""
    with torch.no_grad():
        if names is None:
            layer.lora_B.weight.copy_(torch.randn_like(layer.lora_B.weight) * layer.r**-0.5)
        else:
            for name in names:
                b = layer.lora_B[name].weight
                b.copy_(torch.randn_like(b) * layer.r[name] ** -0.5)


def reference(layer, x):
    """A LoRALinear's output in float64 on the CPU."""
    return lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)


# ==== LoRALinear ===============================================================


def test_parameters_named_and_shaped_like_peft():
    layer = LoRALinear(20, 12, r=4, lora_alpha=8, device=DEVICE)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"weight": (12, 20), "bias": (12,), "lora_A.weight": (4, 20), "lora_B.weight": (12, 4)}
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}
    assert layer.scaling == 2.0
    assert not layer.lora_B.weight.any(), "B starts at zero"
    assert layer.lora_A.weight.abs().min() > 0
    assert set(layer.state_dict()) == set(shapes), "the scaling buffer is not persistent"


def test_positional_arguments_are_nn_linears():
    layer = LoRALinear(20, 12, False, DEVICE, torch.float16, r=2)
    assert layer.bias is None
    assert layer.weight.dtype == layer.lora_A.weight.dtype == torch.float16
    assert layer.weight.device.type == DEVICE
    with pytest.raises(TypeError):
        LoRALinear(20, 12, True, None, None, 4)  # r is keyword-only


def test_rslora_and_gaussian_init():
    layer = LoRALinear(64, 32, r=16, lora_alpha=8, use_rslora=True, init_lora_weights="gaussian")
    assert layer.scaling == 8 / 4 == lora_scaling(16, 8, use_rslora=True)
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / 16, rel=0.2)
    assert not layer.lora_B.weight.any()


def test_init_false_leaves_a_non_zero_update():
    layer = LoRALinear(16, 8, r=2, init_lora_weights=False)
    assert layer.lora_B.weight.abs().min() > 0 and layer.get_delta_weight().abs().max() > 0


@pytest.mark.parametrize("r", [0, -1, 2.0, True])
def test_rank_must_be_positive_integer(r):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRALinear(8, 8, r=r)


@pytest.mark.parametrize("init", ["olora", "pissa_niter_", "pissa_niter_x", None])
def test_unknown_init_is_rejected(init):
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRALinear(8, 8, init_lora_weights=init)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf])
def test_non_finite_lora_alpha_is_rejected(alpha):
    with pytest.raises(ValueError, match="lora_alpha must be finite"):
        LoRALinear(8, 8, lora_alpha=alpha)


@pytest.mark.parametrize("p", [-0.1, 1.0, math.nan])
def test_lora_dropout_must_be_in_range(p):
    with pytest.raises(ValueError, match=r"lora_dropout must be a float in \[0, 1\)"):
        LoRALinear(8, 8, lora_dropout=p)


def test_from_linear_shares_weights_and_starts_equal():
    linear = nn.Linear(48, 33, device=DEVICE)
    x = torch.randn(5, 7, 48, device=DEVICE)
    expected = linear(x)
    layer = LoRALinear.from_linear(linear, r=4, lora_alpha=16)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad and not linear.bias.requires_grad
    assert (layer.r, layer.lora_alpha, layer.scaling) == (4, 16, 4.0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_from_linear_takes_the_constructors_keyword_arguments():
    linear = nn.Linear(32, 16, bias=False, device=DEVICE, dtype=torch.bfloat16)
    layer = LoRALinear.from_linear(
        linear,
        r=4,
        lora_alpha=16,
        lora_dropout=0.25,
        use_rslora=True,
        init_lora_weights="gaussian",
        lora_dtype=torch.float32,
    )
    assert (layer.r, layer.lora_alpha, layer.lora_dropout, layer.use_rslora) == (4, 16, 0.25, True)
    assert layer.scaling == 16 / 2 and layer.init_lora_weights == "gaussian"
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    assert layer.bias is None and layer.weight is linear.weight
    defaults = LoRALinear.from_linear(nn.Linear(8, 4))
    assert (defaults.r, defaults.lora_alpha, defaults.lora_dropout, defaults.scaling) == (8, 8, 0.0, 1.0)
    with pytest.raises(TypeError):
        LoRALinear.from_linear(nn.Linear(8, 4), 4)  # keyword arguments only
    with pytest.raises(TypeError, match="rank"):
        LoRALinear.from_linear(nn.Linear(8, 4), rank=4)


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_fp32_adapters_on_bf16_layer_match_reference(backend):
    linear = nn.Linear(40, 24, device=DEVICE, dtype=torch.bfloat16)
    layer = LoRALinear.from_linear(linear, r=3, lora_alpha=6, lora_dtype=torch.float32)
    randomize_b(layer)
    assert layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(9, 40, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    x64 = f64(x).requires_grad_()
    a64, b64 = f64(layer.lora_A.weight).requires_grad_(), f64(layer.lora_B.weight).requires_grad_()
    ref = lora_linear_reference(x64, layer.weight, layer.bias, a64, b64, 2.0)
    assert_matches_reference(y, ref, torch.bfloat16)
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.to(DEVICE, y.dtype))
    ref.backward(dy.to(torch.bfloat16).double())
    assert layer.lora_A.weight.grad.dtype == torch.float32
    assert_matches_reference(x.grad, x64.grad, torch.bfloat16, "gradients", name="dx")
    assert_matches_reference(layer.lora_A.weight.grad, a64.grad, torch.bfloat16, "gradients", name="dA")
    assert_matches_reference(layer.lora_B.weight.grad, b64.grad, torch.bfloat16, "gradients", name="dB")


def test_training_changes_only_a_and_b(backend):
    layer = LoRALinear(32, 16, r=4, lora_alpha=4, device=DEVICE)
    frozen = {name: p.detach().clone() for name, p in layer.named_parameters()}
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(64, 32, device=DEVICE), torch.randn(64, 16, device=DEVICE)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in layer.named_parameters():
        changed = not torch.equal(p, frozen[name])
        assert changed == name.startswith("lora_"), name
        assert (p.grad is not None) == name.startswith("lora_"), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_then_forward_equals_unmerged(backend, dtype):
    layer = LoRALinear(48, 40, r=8, lora_alpha=16, device=DEVICE, dtype=dtype, init_lora_weights=False)
    x = torch.randn(2, 11, 48, device=DEVICE, dtype=dtype)
    original = layer.weight.detach().clone()
    expected_weight = (original.float() + layer.get_delta_weight()).to(dtype)  # fp32, rounded once
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged and torch.equal(layer.weight, expected_weight)
        merged = layer(x)
        layer.merge()  # a second merge must not add the update twice
        assert torch.equal(layer.weight, expected_weight)
        merged_again = layer(x)
    assert "merged=True" in repr(layer)
    tol = tolerance(dtype) * 2  # two roundings of W' and y apart
    torch.testing.assert_close(merged, unmerged, rtol=tol, atol=tol * unmerged.abs().max().item())
    assert torch.equal(merged_again, merged)
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight, original), "unmerge must restore W bit for bit"
    with torch.no_grad():
        assert torch.equal(layer(x), unmerged)


def test_merge_of_a_float64_layer_is_computed_in_float64():
    layer = LoRALinear(48, 40, r=8, lora_alpha=16, dtype=torch.float64, init_lora_weights=False)
    w = layer.weight.detach().clone()
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    expected = w + layer.scaling * (b @ a)
    through_fp32 = (w.float() + layer.scaling * (b.float() @ a.float())).double()
    assert not torch.equal(expected, through_fp32), "the test must tell float64 from float32"
    assert layer.get_delta_weight().dtype == torch.float64
    layer.merge()
    assert layer.weight.dtype == torch.float64
    assert torch.equal(layer.weight, expected)
    layer.unmerge()
    assert torch.equal(layer.weight, w)


def test_merge_changes_the_shared_weight_in_place():
    linear = nn.Linear(16, 8)
    layer = LoRALinear.from_linear(linear, r=2, init_lora_weights=False)
    before = linear.weight.detach().clone()
    layer.merge()
    expected = (before.double() + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()).float()
    torch.testing.assert_close(linear.weight.detach(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(linear.weight, before)
    layer.unmerge()
    assert torch.equal(linear.weight, before)


def test_unmerge_without_merge_is_a_no_op():
    layer = LoRALinear(8, 8)
    before = layer.weight.detach().clone()
    layer.unmerge()
    assert torch.equal(layer.weight, before) and not layer.merged


def test_scaling_reads_as_a_float_and_setting_it_changes_the_output(backend):
    layer = LoRALinear(24, 16, r=4, lora_alpha=8, device=DEVICE, init_lora_weights=False)
    assert type(layer.scaling) is float and layer.scaling == 2.0
    x = torch.randn(7, 24, device=DEVICE)
    with torch.no_grad():
        before = layer(x)
        layer.scaling = 0.375
        assert type(layer.scaling) is float and layer.scaling == 0.375
        after = layer(x)
    assert not torch.allclose(after, before)
    assert_matches_reference(after, reference(layer, x), torch.float32)
    assert "_scalings" not in layer.state_dict() and "scaling=0.375" in repr(layer)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="scaling must be finite"):
            layer.scaling = bad
    with pytest.raises(TypeError, match="scaling must be a Python float"):
        layer.scaling = "2"
    assert layer.scaling == 0.375, "a rejected value leaves the scaling as it was"
    with torch.no_grad():
        assert torch.equal(layer(x), after)


def test_scaling_stays_exact_through_dtype_changes(backend):
    """.to(bf16) must not round the scaling (rsLoRA's 16 / sqrt(8) is not a
    bf16 number), and .double() must make it float64 again."""
    skip_if_no_float64(backend)
    exact = 16 / math.sqrt(8)
    layer = LoRALinear(24, 16, r=8, lora_alpha=16, use_rslora=True, device=DEVICE, init_lora_weights=False)
    assert layer.scaling == exact
    layer.to(torch.bfloat16)
    assert layer.scaling == exact and layer.lora_A.weight.dtype == torch.bfloat16
    x = torch.randn(64, 24, device=DEVICE, dtype=torch.bfloat16)  # enough outputs that a rounded scaling shows
    args = (layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight)
    with torch.no_grad():
        # lora_linear with a float scaling runs in fp32 with the exact value: the layer must match it bit for bit.
        assert torch.equal(layer(x), lora_linear(x, *args, exact))
        assert not torch.equal(layer(x), lora_linear(x, *args, float(torch.tensor(exact).bfloat16())))
    layer.double()
    assert layer.scaling == exact and layer.weight.dtype == layer.lora_A.weight.dtype == torch.float64
    x = torch.randn(5, 24, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float64
    assert_matches_reference(y, reference(layer, x), torch.float64)


def test_meta_device_gives_a_meta_output_as_nn_linear():
    layer = LoRALinear(8, 6, device="meta")
    y = layer(torch.empty(2, 8, device="meta"))
    linear_y = nn.Linear(8, 6, device="meta")(torch.empty(2, 8, device="meta"))
    assert y.device.type == linear_y.device.type == "meta"
    assert y.shape == linear_y.shape == (2, 6) and y.dtype == linear_y.dtype


def test_extra_repr():
    text = repr(LoRALinear(8, 4, r=2, lora_alpha=4))
    assert "in_features=8, out_features=4, bias=True, r=2, lora_alpha=4, scaling=2, merged=False" in text


# ==== MultiLoRALinear ==========================================================


def make_layer(ranks=(4, 8), dtype=None, bias=True, lora_dtype=None, device=DEVICE):
    """Adapters task0, task1, ... of these ranks, lora_alpha = 2 r (scaling 2), B random."""
    layer = MultiLoRALinear(20, 12, bias, device, dtype)
    for i, r in enumerate(ranks):
        layer.add_adapter(f"task{i}", r, 2 * r, init_lora_weights=False, lora_dtype=lora_dtype)
    return layer


def adapters_of(layer):
    names = layer.adapter_names
    return (
        [layer.lora_A[n].weight for n in names],
        [layer.lora_B[n].weight for n in names],
        [layer.scaling[n] for n in names],
    )


def multi_reference(layer, x, ids):
    """The float64 per-adapter loop on the layer's own parameters."""
    return multi_lora_reference(x, layer.weight, layer.bias, *adapters_of(layer), ids.cpu())


def test_multi_parameters_named_like_peft():
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
    assert set(layer.state_dict()) == set(shapes)
    assert layer.adapter_names == ["task0", "task1"]
    assert layer.r == {"task0": 4, "task1": 8} and layer.scaling == {"task0": 2.0, "task1": 2.0}
    assert layer.lora_dropout == {"task0": 0.0, "task1": 0.0} and layer.active_adapter is None


def test_multi_from_linear_shares_weights_and_new_adapters_start_at_base():
    linear = nn.Linear(20, 12, device=DEVICE)
    layer = MultiLoRALinear.from_linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias and not linear.weight.requires_grad
    assert layer.adapter_names == []
    layer.add_adapter("a", 4, 8)
    layer.add_adapter("b", 2, 2, use_rslora=True, init_lora_weights="gaussian")
    assert layer.scaling == {"a": 2.0, "b": 2 / math.sqrt(2)}
    assert not layer.lora_B["a"].weight.any() and not layer.lora_B["b"].weight.any()
    x = torch.randn(3, 5, 20, device=DEVICE)
    torch.testing.assert_close(layer(x, torch.tensor([0, 1, -1])), linear(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear"):
        MultiLoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_multi_layer_forward_matches_reference_and_trains(backend):
    """Ids per batch entry, ids per row and PEFT's adapter_names give the
    float64 loop's output; only the adapters used get gradients, which match
    the loop's."""
    layer = make_layer(ranks=(4, 8, 2))
    x = torch.randn(4, 5, 20, device=DEVICE)
    names = ["task2", "__base__", "task0", "task2"]
    ids = torch.tensor([2, -1, 0, 2])
    y = layer(x, adapter_names=names)
    assert torch.equal(layer(x, ids.to(DEVICE)), y)
    assert torch.equal(layer(x, ids[:, None].expand(4, 5).contiguous()), y)  # one id per row
    ref_layer = make_layer(ranks=(4, 8, 2), device="cpu").double()
    ref_layer.load_state_dict({k: f64(v) for k, v in layer.state_dict().items()})
    for p in ref_layer.parameters():
        p.requires_grad_(False)
    for name in ref_layer.adapter_names:
        ref_layer.lora_A[name].weight.requires_grad_()
        ref_layer.lora_B[name].weight.requires_grad_()
    ref = multi_reference(ref_layer, f64(x), ids)
    assert_matches_reference(y, ref, torch.float32, name="y")
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.to(DEVICE, torch.float32))
    ref.backward(dy)
    for name in ("task0", "task2"):
        for ab in ("lora_A", "lora_B"):
            got, want = getattr(layer, ab)[name].weight.grad, getattr(ref_layer, ab)[name].weight.grad
            assert_matches_reference(got, want, torch.float32, "gradients", name=f"{ab}.{name}")
    assert layer.lora_A["task1"].weight.grad is None and layer.lora_B["task1"].weight.grad is None, (
        "an adapter with no rows gets no gradient"
    )
    assert layer.weight.grad is None and layer.bias.grad is None


def test_multi_fp32_adapters_on_bf16_layer_match_reference(backend):
    layer = make_layer(dtype=torch.bfloat16, lora_dtype=torch.float32)
    assert layer.lora_A["task0"].weight.dtype == torch.float32
    x = torch.randn(6, 20, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.tensor([0, 1, 1, -1, 0, 1])
    y = layer(x, ids.to(DEVICE))
    assert y.dtype == torch.bfloat16
    assert_matches_reference(y, multi_reference(layer, x, ids), torch.bfloat16)
    with pytest.raises(ValueError, match="share one dtype"):
        layer.add_adapter("half", 2, lora_dtype=torch.bfloat16)


def test_remove_adapter_shifts_indices():
    layer = make_layer(ranks=(4, 8, 2))
    x = torch.randn(2, 20, device=DEVICE)
    with torch.no_grad():
        before = layer(x, adapter_names=["task2", "task0"])
    layer.remove_adapter("task1")
    assert layer.adapter_names == ["task0", "task2"]
    assert layer.scaling == {"task0": 2.0, "task2": 2.0} and layer.r == {"task0": 4, "task2": 2}
    assert "lora_A.task1.weight" not in layer.state_dict()
    with torch.no_grad():
        assert torch.equal(layer(x, torch.tensor([1, 0], device=DEVICE)), before)
    with pytest.raises(KeyError, match="no adapter 'task1'"):
        layer.remove_adapter("task1")
    with pytest.raises(ValueError, match=r"adapter index in \[0, 2\)"):
        layer(x, torch.tensor([2, 0]))
    layer.add_adapter("task3", 3, 3, init_lora_weights=False)  # takes the next index
    assert layer.adapter_names == ["task0", "task2", "task3"] and layer.scaling["task3"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(name="task0"), ValueError, "exists already"),
        (dict(name="a.b"), ValueError, "adapter name must be a non-empty str"),
        (dict(name=""), ValueError, "adapter name must be a non-empty str"),
        (dict(name=3), ValueError, "adapter name must be a non-empty str"),
        (dict(name="__base__"), ValueError, "adapter name must be"),
        (dict(name="new", r=0), ValueError, "r must be a positive integer"),
        (dict(name="new", init_lora_weights="pissa"), ValueError, "init_lora_weights must be"),
        (dict(name="new", lora_alpha=math.nan), ValueError, "lora_alpha must be finite"),
        (dict(name="new", lora_alpha=math.inf), ValueError, "lora_alpha must be finite"),
        (dict(name="new", lora_dropout=1.0), ValueError, r"lora_dropout must be a float in \[0, 1\)"),
        (dict(name="new", lora_dtype=torch.float64), ValueError, "share one dtype"),
    ],
    ids=["duplicate", "dot", "empty", "not a str", "base", "r=0", "init", "nan alpha", "inf alpha", "dropout", "dtype"],
)
def test_bad_add_adapter(kwargs, error, message):
    layer = make_layer()
    with pytest.raises(error, match=message):
        layer.add_adapter(**kwargs)
    assert layer.adapter_names == ["task0", "task1"] and len(layer.scaling) == 2, "a failed add changes nothing"


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda layer, x: layer(x), ValueError, "pass adapter_ids or adapter_names"),
        (lambda layer, x: layer(x, torch.zeros(3, dtype=torch.int64), adapter_names=["task0"] * 3), ValueError,
         "pass at most one of adapter_ids and adapter_names"),
        (lambda layer, x: layer(x, adapter_names=["task0", "nope", "task1"]), ValueError, r"adapter_names\[1\]"),
        (lambda layer, x: layer(x, adapter_names="task0"), TypeError, "adapter_names must be a list of str"),
        (lambda layer, x: layer(x, adapter_names=["task0"]), ValueError, "adapter_ids must have x's leading shape"),
        (lambda layer, x: layer(x, torch.tensor([0, 2, 1])), ValueError, r"adapter index in \[0, 2\)"),
        (lambda layer, x: layer(x, torch.zeros(3)), TypeError, "adapter_ids must be an integer tensor"),
    ],
    ids=["neither", "both", "unknown name", "a str", "too few names", "id out of range", "float ids"],
)  # fmt: skip
def test_bad_forward(call, error, message):
    with pytest.raises(error, match=message):
        call(make_layer(), torch.randn(3, 20, device=DEVICE))


def test_multi_extra_repr_lists_adapters():
    text = repr(make_layer())
    assert "in_features=20, out_features=12, bias=True" in text
    assert "adapters={task0: r=4, scaling=2, task1: r=8, scaling=2}, merged=None" in text


def test_per_adapter_dropout_in_training_only(backend):
    """Each adapter's rows drop with its own p, from the mask that
    dropout_mask gives for the call's seed (drawn from torch's generator);
    the base term and rows without dropout are untouched; eval mode has none.
    The gradients of A and B follow the same mask."""
    layer = MultiLoRALinear(20, 12, device=DEVICE)
    for name, r, p in (("task0", 4, 0.5), ("task1", 2, 0.0), ("task2", 3, 0.25)):
        layer.add_adapter(name, r, 2 * r, lora_dropout=p, init_lora_weights=False)
    assert layer.lora_dropout == {"task0": 0.5, "task1": 0.0, "task2": 0.25}
    ids = torch.tensor([0, 1, 2, -1, 0, 2, 0, 1])
    x = torch.randn(8, 20, device=DEVICE)
    layer.train()
    torch.manual_seed(1234)
    y = layer(x, ids.to(DEVICE))
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**31 - 1, ()))  # the draw the forward made

    a64 = [f64(a).requires_grad_() for a in adapters_of(layer)[0]]
    b64 = [f64(b).requires_grad_() for b in adapters_of(layer)[1]]
    x64 = f64(x)
    ref = F.linear(x64, f64(layer.weight), f64(layer.bias))
    rows_ref = []
    for i, a in enumerate(ids.tolist()):
        row = ref[i]
        if a >= 0:
            p = layer.lora_dropout[layer.adapter_names[a]]
            d = x64[i]
            if p > 0:
                keep = fused_lora.dropout_mask((8, 20), p, seed, DEVICE)[i].cpu()
                d = d * keep / (1 - p)
            row = row + layer.scaling[layer.adapter_names[a]] * (b64[a] @ (a64[a] @ d))
        rows_ref.append(row)
    ref = torch.stack(rows_ref)
    assert_matches_reference(y, ref, torch.float32, name="y with dropout")
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.to(DEVICE, torch.float32))
    ref.backward(dy)
    for a, name in enumerate(layer.adapter_names):
        assert_matches_reference(layer.lora_A[name].weight.grad, a64[a].grad, torch.float32, "gradients", f"dA {name}")
        assert_matches_reference(layer.lora_B[name].weight.grad, b64[a].grad, torch.float32, "gradients", f"dB {name}")

    no_dropout = multi_reference(layer, x, ids)
    for a in (0, 2):
        assert not torch.allclose(ref[ids == a], no_dropout[ids == a]), f"the dropout must show on task{a}'s rows"
    layer.eval()
    with torch.no_grad():
        assert_matches_reference(layer(x, ids), no_dropout, torch.float32, name="y in eval mode")


def test_active_adapter(backend):
    layer = make_layer(ranks=(4, 2))
    x = torch.randn(3, 5, 20, device=DEVICE)
    assert layer.active_adapter is None
    with pytest.raises(ValueError, match="set active_adapter"):
        layer(x)
    layer.active_adapter = "task1"
    with torch.no_grad():
        y = layer(x)
        assert torch.equal(y, layer(x, adapter_names=["task1"] * 3))
        assert_matches_reference(y, multi_reference(layer, x, torch.ones(3, dtype=torch.int64)), torch.float32)
        one_row = torch.randn(20, device=DEVICE)  # a 1-D x: one row
        assert torch.equal(layer(one_row), layer(one_row[None], adapter_names=["task1"])[0])
        layer.active_adapter = "__base__"
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        layer.active_adapter = "nope"
    assert layer.active_adapter == "__base__"
    layer.active_adapter = "task0"
    layer.remove_adapter("task0")
    assert layer.active_adapter is None, "removing the active adapter leaves none active"
    layer.active_adapter = None
    with pytest.raises(ValueError, match="pass adapter_ids or adapter_names"):
        layer(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_merge_and_unmerge(backend, dtype):
    layer = make_layer(ranks=(4, 8), dtype=dtype)
    x = torch.randn(3, 5, 20, device=DEVICE, dtype=dtype)
    on_task1 = ["task1"] * 3
    original = layer.weight.detach().clone()
    expected_weight = (original.float() + layer.get_delta_weight("task1")).to(dtype)
    with torch.no_grad():
        unmerged = layer(x, adapter_names=on_task1)
        layer.merge("task1")
        assert layer.merged and layer.merged_adapter == "task1"
        assert torch.equal(layer.weight, expected_weight)
        merged = layer(x, adapter_names=on_task1)
        layer.merge("task1")  # merging it again is a no-op
        assert torch.equal(layer.weight, expected_weight)
        layer.active_adapter = "task1"
        assert torch.equal(layer(x), merged)
    tol = tolerance(dtype) * 2
    torch.testing.assert_close(merged, unmerged, rtol=tol, atol=tol * unmerged.abs().max().item())
    assert "merged=task1" in repr(layer)

    for names in (["task1", "task0", "task1"], ["task1", "__base__", "task1"]):
        with pytest.raises(ValueError, match="'task1' is merged into the weight"):
            layer(x, adapter_names=names)
    with pytest.raises(ValueError, match="'task1' is merged into the weight"):
        layer(x, torch.tensor([1, 1, -1]))
    with pytest.raises(ValueError, match="'task1' is merged: unmerge"):
        layer.merge("task0")
    with pytest.raises(ValueError, match="unmerge"):
        layer.remove_adapter("task1")
    with pytest.raises(ValueError, match="unmerge"):
        layer.add_adapter("task2", 2)
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        layer.merge("nope")
    assert torch.equal(layer.weight, expected_weight), "failed calls leave the merged weight"

    layer.unmerge()
    assert not layer.merged and layer.merged_adapter is None
    assert torch.equal(layer.weight, original), "unmerge must restore W bit for bit"
    with torch.no_grad():
        assert torch.equal(layer(x, adapter_names=on_task1), unmerged)
    layer.merge("task0")  # another adapter now
    assert layer.merged_adapter == "task0"
    layer.unmerge()
    layer.unmerge()  # twice: a no-op
    assert torch.equal(layer.weight, original)


def test_multi_scalings_stay_exact_through_dtype_changes(backend):
    exact = [16 / math.sqrt(8), 1 / 3]
    layer = MultiLoRALinear(24, 16, device=DEVICE)
    layer.add_adapter("rs", 8, 16, use_rslora=True, init_lora_weights=False)
    layer.add_adapter("third", 3, 1, init_lora_weights=False)
    layer.to(torch.bfloat16)
    assert list(layer.scaling.values()) == exact
    x = torch.randn(64, 24, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.arange(64) % 2
    lora_a, lora_b, _ = adapters_of(layer)
    with torch.no_grad():
        y = layer(x, ids)
        assert torch.equal(y, fused_lora.multi_lora_linear(x, layer.weight, layer.bias, lora_a, lora_b, exact, ids))
        rounded = [float(torch.tensor(s).bfloat16()) for s in exact]
        assert not torch.equal(
            y, fused_lora.multi_lora_linear(x, layer.weight, layer.bias, lora_a, lora_b, rounded, ids)
        )


def test_multi_merge_of_a_float64_layer_is_computed_in_float64():
    layer = make_layer(ranks=(4, 8), dtype=torch.float64)
    w = layer.weight.detach().clone()
    a, b = layer.lora_A["task1"].weight.detach(), layer.lora_B["task1"].weight.detach()
    layer.merge("task1")
    assert torch.equal(layer.weight, w + layer.scaling["task1"] * (b @ a))


def two_layer_model():
    """Two MultiLoRALinear layers; the second lacks adapter "b"."""
    first = MultiLoRALinear(16, 24, device=DEVICE)
    first.add_adapter("a", 4, 8, init_lora_weights=False)
    first.add_adapter("b", 2, 2, init_lora_weights=False)
    second = MultiLoRALinear(24, 8, device=DEVICE)
    second.add_adapter("a", 3, 6, init_lora_weights=False)
    return nn.Sequential(first, nn.GELU(), second)


def explicit(model, x, names):
    """The model with each layer's names given by hand: a name a layer lacks is its base layer."""
    h = model[1](model[0](x, adapter_names=names))
    return model[2](h, adapter_names=[n if n in model[2].adapter_names else "__base__" for n in names])


def test_adapter_names_context_sets_every_layers_rows(backend):
    model = two_layer_model()
    x = torch.randn(4, 5, 16, device=DEVICE)
    names = ["b", "a", "__base__", "b"]
    want = explicit(model, x, names)
    want.square().sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(want_grads) == {
        f"{i}.lora_{ab}.{name}.weight" for i, name in ((0, "a"), (0, "b"), (2, "a")) for ab in "AB"
    }
    model.zero_grad(set_to_none=True)

    with fused_lora.adapter_names(model, names) as entered:
        assert entered is model
        got = model(x)  # training mode: gradients flow
        got.square().sum().backward()
    assert model.training
    assert torch.equal(got, want)
    for name, grad in want_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-6, atol=1e-7, msg=name)

    # The float64 reference: "b" is the base layer in the second layer.
    h = multi_reference(model[0], x, torch.tensor([1, 0, -1, 1]))
    ref = multi_reference(model[2], F.gelu(h), torch.tensor([-1, 0, -1, -1]))
    assert_matches_reference(got, ref, torch.float32)


def test_adapter_names_context_restores_the_previous_state():
    model = two_layer_model()
    x = torch.randn(2, 16, device=DEVICE)
    with torch.no_grad():
        on_a, on_b = explicit(model, x, ["a", "a"]), explicit(model, x, ["b", "__base__"])
        with fused_lora.adapter_names(model, ["a", "a"]):
            assert torch.equal(model(x), on_a)
            with fused_lora.adapter_names(model, ["b", "__base__"]):
                assert torch.equal(model(x), on_b)
            assert torch.equal(model(x), on_a), "the outer block's names again"
        with pytest.raises(ValueError, match="set active_adapter"):
            model(x)
        with pytest.raises(RuntimeError, match="boom"), fused_lora.adapter_names(model, ["a", "a"]):
            raise RuntimeError("boom")
        with pytest.raises(ValueError, match="set active_adapter"):
            model(x)
        model[0].active_adapter = model[2].active_adapter = "a"
        with fused_lora.adapter_names(model, ["b", "__base__"]):
            assert torch.equal(model(x), on_b), "the names win over active_adapter"
        assert torch.equal(model(x), on_a)


def test_adapter_names_context_rejects_unknown_names():
    model = two_layer_model()
    with pytest.raises(ValueError, match=r"adapter names \['c'\] are not adapters of the model"):
        with fused_lora.adapter_names(model, ["a", "c"]):
            pass
    with pytest.raises(TypeError, match="names must be a list of str"):
        with fused_lora.adapter_names(model, "a"):
            pass
    with pytest.raises(ValueError, match="set active_adapter"):
        model(torch.randn(2, 16, device=DEVICE))


def test_multi_meta_device():
    layer = MultiLoRALinear(8, 6, device="meta")
    layer.add_adapter("a", 2)
    x = torch.empty(2, 8, device="meta")
    for y in (layer(x, torch.tensor([0, -1], device="meta")), layer(x, adapter_names=["a", "__base__"])):
        assert y.device.type == "meta" and y.shape == (2, 6) and y.dtype == torch.float32
    layer.active_adapter = "a"
    assert layer(x).shape == (2, 6)


def test_multi_layer_without_adapters_is_the_base_layer(backend):
    """A fresh layer (and one whose adapters were all removed) computes
    nn.Linear's output and input gradient on rows of id -1."""
    layer = MultiLoRALinear(20, 12, device=DEVICE)
    for step in ("fresh", "all removed"):
        x = torch.randn(6, 20, device=DEVICE, requires_grad=True)
        y = layer(x, torch.full((6,), -1))
        assert_matches_reference(y, F.linear(f64(x), f64(layer.weight), f64(layer.bias)), torch.float32, name=step)
        dy = torch.randn(6, 12, device=DEVICE)
        y.backward(dy)
        assert_matches_reference(x.grad, f64(dy) @ f64(layer.weight), torch.float32, "gradients", name=f"{step} dx")
        layer.add_adapter("a", 2)
        layer.remove_adapter("a")
