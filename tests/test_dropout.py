"""Dropout on the LoRA branch, on both backends: the forward and every
gradient against the float64 reference built from the mask `dropout_mask`
regenerates (so the forward, dX and dA share one mask), the mask's
statistics, seeds, the logical element index for strided x, one and many
adapters, training vs eval mode of the layers, and bad p / seeds."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, interpreted_only
from helpers import DTYPE_PAIRS, PAIR_IDS, assert_matches_reference, lora_inputs, multi_inputs, randn

import fused_lora
from fused_lora import LoRALinear, MultiLoRALinear, dropout_mask, multi_lora_linear
from fused_lora.kernels import configs

NAMES = ("x", "weight", "bias", "lora_a", "lora_b")


def reference_with_mask(x, weight, bias, lora_a, lora_b, scaling, mask, p):
    """x W^T + b + s (d A^T) B^T with d = mask * x / (1 - p), in float64."""
    d = x * mask.to(x.dtype) / (1 - p)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(d, lora_a), lora_b)


def check_dropout_layer(inputs, p, seed=1234, x_view=None, scaling=0.5):
    """lora_linear with dropout against the float64 reference given the mask
    of dropout_mask; y and the gradients of x, W, bias, A and B."""
    dtype, adapter_dtype = inputs["x"].dtype, inputs["lora_a"].dtype
    ours = {n: None if t is None else t.detach().clone().requires_grad_() for n, t in inputs.items()}
    ref = {n: None if t is None else t.detach().to("cpu", torch.float64).requires_grad_() for n, t in inputs.items()}
    view = x_view or (lambda t: t)
    x = view(ours["x"])
    y = fused_lora.lora_linear(x, *(ours[n] for n in NAMES[1:]), scaling, dropout_p=p, seed=seed)
    mask = dropout_mask(x.shape, p, seed, device=DEVICE).cpu()
    assert mask.shape == x.shape and mask.dtype == torch.bool
    ref_y = reference_with_mask(view(ref["x"]), *(ref[n] for n in NAMES[1:]), scaling, mask, p)
    assert_matches_reference(y, ref_y, dtype, name="y")
    dy = randn(*y.shape, dtype=dtype, device=DEVICE)
    y.backward(dy)
    ref_y.backward(dy.to("cpu", torch.float64))
    for name in NAMES:
        if ours[name] is not None:
            grad_dtype = adapter_dtype if name.startswith("lora") else dtype
            assert_matches_reference(ours[name].grad, ref[name].grad, grad_dtype, "gradients", name=f"d{name}")
    return mask


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
def test_dropout_matches_reference_with_the_same_mask(backend, dtype, adapter_dtype):
    """The forward, dX (masked G A) and dA (masked x) all use the mask that
    dropout_mask regenerates: a mask differing anywhere fails one of them."""
    inputs = lora_inputs(33, 100, 48, 5, dtype, adapter_dtype, device=DEVICE)
    mask = check_dropout_layer(inputs, p=0.3)
    assert 0.6 < mask.float().mean() < 0.8


@pytest.mark.parametrize("p", [0.05, 0.9])
def test_extreme_p(backend, p):
    inputs = lora_inputs(20, 48, 24, 4, torch.float32, device=DEVICE)
    check_dropout_layer(inputs, p=p, seed=77)


def test_dropout_of_one_row_and_no_rows(backend):
    check_dropout_layer(lora_inputs(1, 16, 12, 2, torch.float32, device=DEVICE), p=0.5)
    y = fused_lora.lora_linear(*lora_inputs(0, 16, 12, 2, torch.float32, device=DEVICE).values(), 1.0, dropout_p=0.5)
    assert y.shape == (0, 12)


def test_dropout_is_not_a_no_op(backend):
    """The reference comparison above can fail: with dropout, y differs from
    the output without it (on the LoRA branch only)."""
    inputs = lora_inputs(16, 32, 24, 4, torch.float32, device=DEVICE)
    with_dropout = fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=0.5, seed=3)
    without = fused_lora.lora_linear(*inputs.values(), 1.0)
    assert not torch.allclose(with_dropout, without, atol=1e-3)
    base = F.linear(inputs["x"], inputs["weight"], inputs["bias"])
    mask = dropout_mask((16, 32), 0.5, 3, DEVICE)
    branch = ((inputs["x"] * mask / 0.5) @ inputs["lora_a"].t()) @ inputs["lora_b"].t()
    torch.testing.assert_close(with_dropout, base + branch, rtol=1e-5, atol=1e-5)


@interpreted_only
def test_dropout_multi_tile():
    with fused_lora.set_backend("triton"), configs.use_interpreter_config("small"):
        inputs = lora_inputs(40, 37, 33, 3, torch.float32, device=DEVICE)
        check_dropout_layer(inputs, p=0.5)


def test_mask_follows_the_logical_index(backend):
    """A transposed view of x gets the mask of its logical (row, col) order,
    not of its memory order."""
    inputs = lora_inputs(1, 24, 16, 2, torch.float32, device=DEVICE)
    inputs["x"] = randn(5, 3, 24, device=DEVICE)
    mask = check_dropout_layer(inputs, p=0.4, x_view=lambda t: t.transpose(0, 1))
    assert mask.shape == (3, 5, 24)


def test_mask_of_a_3d_shape_is_the_flattened_one(backend):
    flat = dropout_mask((12, 40), 0.3, 5, DEVICE)
    torch.testing.assert_close(dropout_mask((3, 4, 40), 0.3, 5, DEVICE), flat.reshape(3, 4, 40), rtol=0, atol=0)


def test_mask_thresholds_one_uniform_per_element(backend):
    """One draw per element, kept where u >= p: a larger p drops a superset
    (what per-adapter p relies on), and p = 0 keeps everything."""
    masks = [dropout_mask((64, 48), p, 11, DEVICE) for p in (0.0, 0.2, 0.5, 0.8)]
    assert masks[0].all()
    for looser, stricter in itertools.pairwise(masks):
        assert (stricter <= looser).all() and (looser & ~stricter).any()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction(backend, p):
    mask = dropout_mask((400, 300), p, 7, device=DEVICE)
    assert mask.dtype == torch.bool and mask.shape == (400, 300) and mask.device.type == DEVICE
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01
    # per row and per column too: a mask keyed on the wrong index would skew some
    assert (mask.float().mean(1) - (1 - p)).abs().max() < 0.12
    assert (mask.float().mean(0) - (1 - p)).abs().max() < 0.12
    # neither rows nor columns repeat: a mask keyed on one index only would
    assert len({tuple(row.tolist()) for row in mask[:50]}) == 50
    assert len({tuple(col.tolist()) for col in mask.t()[:50]}) == 50


def test_seeds(backend):
    assert torch.equal(dropout_mask((64, 64), 0.5, 3, DEVICE), dropout_mask((64, 64), 0.5, 3, DEVICE))
    assert not torch.equal(dropout_mask((64, 64), 0.5, 3, DEVICE), dropout_mask((64, 64), 0.5, 4, DEVICE))
    inputs = lora_inputs(16, 32, 24, 4, torch.float32, device=DEVICE)
    torch.manual_seed(0)
    first = fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=0.5)
    second = fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=0.5)
    torch.manual_seed(0)
    again = fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=0.5)
    assert not torch.equal(first, second), "each call draws a new seed"
    assert torch.equal(first, again), "seeds come from torch's generator"
    fixed = fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=0.5, seed=123)
    assert torch.equal(fixed, fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=0.5, seed=123))


def test_largest_seed(backend):
    check_dropout_layer(lora_inputs(9, 16, 12, 2, torch.float32, device=DEVICE), p=0.5, seed=2**31 - 1)


# ---- many adapters ---------------------------------------------------------------


def multi_reference_with_mask(x, weight, bias, lora_a, lora_b, scalings, ids, mask, p):
    """The float64 per-adapter loop with d = mask * x / (1 - p) for every row."""
    d = x * mask.to(x.dtype) / (1 - p)
    y = F.linear(x, weight, bias)
    for a in range(len(lora_a)):
        rows = (ids == a).nonzero().squeeze(1)
        y = y.index_add(0, rows, scalings[a] * F.linear(F.linear(d[rows], lora_a[a]), lora_b[a]))
    return y


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("m", [12, 40], ids=lambda m: f"M={m}")
def test_multi_adapter_dropout_matches_reference(backend, m, dtype, adapter_dtype):
    """One p for every adapter: each row's LoRA input is masked by the mask
    dropout_mask gives for x; rows without an adapter have none."""
    p, seed = 0.4, 31
    inputs = multi_inputs(m, 40, 24, [4, 1, 8], dtype, adapter_dtype, device=DEVICE)
    tensors = ("x", "weight", "bias")
    ours = {n: inputs[n].clone().requires_grad_() for n in tensors}
    ref = {n: inputs[n].to("cpu", torch.float64).requires_grad_() for n in tensors}
    ours_a = [t.clone().requires_grad_() for t in (*inputs["lora_a"], *inputs["lora_b"])]
    ref_a = [t.to("cpu", torch.float64).requires_grad_() for t in (*inputs["lora_a"], *inputs["lora_b"])]
    args = (inputs["scalings"], inputs["adapter_ids"])
    y = multi_lora_linear(*ours.values(), ours_a[:3], ours_a[3:], *args, dropout_p=p, seed=seed)
    mask = dropout_mask((m, 40), p, seed, DEVICE).cpu()
    ref_y = multi_reference_with_mask(*ref.values(), ref_a[:3], ref_a[3:], *args[:1], args[1].cpu(), mask, p)
    assert_matches_reference(y, ref_y, dtype, name="y")
    dy = randn(*y.shape, dtype=dtype, device=DEVICE)
    y.backward(dy)
    ref_y.backward(dy.to("cpu", torch.float64))
    for name in tensors:
        assert_matches_reference(ours[name].grad, ref[name].grad, dtype, "gradients", name=f"d{name}")
    used = set(inputs["adapter_ids"].tolist())
    for i, (t, ref_t) in enumerate(zip(ours_a, ref_a, strict=True)):
        if i % 3 not in used:
            assert t.grad is None
        else:
            assert_matches_reference(t.grad, ref_t.grad, adapter_dtype, "gradients", name=f"adapter tensor {i}")


def test_multi_adapter_dropout_equals_lora_linear_on_one_adapter(backend):
    """All rows on one adapter: the same mask, so the same y and gradients
    as lora_linear with the same p and seed."""
    inputs = lora_inputs(24, 32, 20, 4, torch.float32, device=DEVICE)
    results = []
    for call in (
        lambda t: fused_lora.lora_linear(*t, 0.7, dropout_p=0.3, seed=8),
        lambda t: multi_lora_linear(
            *t[:3], [t[3]], [t[4]], [0.7], torch.zeros(24, dtype=torch.int64, device=DEVICE), dropout_p=[0.3], seed=8
        ),
    ):
        ts = [v.clone().requires_grad_() for v in inputs.values()]
        y = call(ts)
        y.backward(torch.ones_like(y))
        results.append([y, *(t.grad for t in ts)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@interpreted_only
def test_multi_adapter_dropout_multi_tile():
    p, seed = 0.5, 4
    with fused_lora.set_backend("triton"), configs.use_interpreter_config("small"):
        inputs = multi_inputs(50, 37, 20, [5, 16], torch.float32, device=DEVICE)
        x = inputs["x"].clone().requires_grad_()
        a = [t.clone().requires_grad_() for t in inputs["lora_a"]]
        y = multi_lora_linear(
            x,
            inputs["weight"],
            inputs["bias"],
            a,
            inputs["lora_b"],
            inputs["scalings"],
            inputs["adapter_ids"],
            dropout_p=p,
            seed=seed,
        )
        mask = dropout_mask((50, 37), p, seed, DEVICE).cpu()
    ref_x = inputs["x"].double().requires_grad_()
    ref_a = [t.double().requires_grad_() for t in inputs["lora_a"]]
    ref_y = multi_reference_with_mask(
        ref_x,
        inputs["weight"].double(),
        inputs["bias"].double(),
        ref_a,
        [t.double() for t in inputs["lora_b"]],
        inputs["scalings"],
        inputs["adapter_ids"],
        mask,
        p,
    )
    assert_matches_reference(y, ref_y, torch.float32, name="y")
    y.backward(torch.ones_like(y))
    ref_y.backward(torch.ones_like(ref_y))
    assert_matches_reference(x.grad, ref_x.grad, torch.float32, "gradients", name="dx")
    for t, ref_t in zip(a, ref_a, strict=True):
        assert_matches_reference(t.grad, ref_t.grad, torch.float32, "gradients", name="dA")


# ---- layers: dropout in training mode only ------------------------------------


def test_layer_drops_in_training_only(backend):
    layer = LoRALinear(32, 24, r=4, lora_dropout=0.5, init_lora_weights=False, device=DEVICE)
    x = torch.randn(16, 32, device=DEVICE)
    plain = fused_lora.lora_linear(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    layer.eval()
    torch.testing.assert_close(layer(x), plain, rtol=0, atol=0)
    layer.train()
    torch.manual_seed(5)
    trained = layer(x)
    assert not torch.allclose(trained, plain, atol=1e-3)
    torch.manual_seed(5)  # the layer draws its seed from torch's generator
    seed = int(torch.randint(0, 2**31 - 1, ()))
    mask = dropout_mask(x.shape, 0.5, seed, DEVICE)
    expected = (
        F.linear(x, layer.weight, layer.bias)
        + layer.scaling * ((x * mask / 0.5) @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    )
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-5)


def test_multi_layer_drops_per_adapter_in_training_only(backend):
    layer = MultiLoRALinear(32, 24, device=DEVICE)
    layer.add_adapter("dropped", 4, 8, lora_dropout=0.5, init_lora_weights=False)
    layer.add_adapter("kept", 2, 4, lora_dropout=0.0, init_lora_weights=False)
    x = torch.randn(8, 32, device=DEVICE)
    ids = torch.tensor([0, 1] * 4, device=DEVICE)
    layer.eval()
    plain = layer(x, ids)
    layer.train()
    trained = layer(x, ids)
    torch.testing.assert_close(trained[1::2], plain[1::2], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(trained[0::2], plain[0::2], atol=1e-3)


# ---- bad p and seeds ------------------------------------------------------------


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), True, "0.1", None])
def test_bad_dropout(p):
    inputs = lora_inputs(2, 8, 4, 2, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match=r"^dropout_p must be a float in \[0, 1\)"):
        fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=p)
    with pytest.raises(ValueError, match=r"^dropout_p must be a float in \[0, 1\)"):
        dropout_mask((4, 4), p, 1, DEVICE)
    multi = multi_inputs(2, 8, 4, [2, 3], torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match=r"^dropout_p\[1\] must be a float in \[0, 1\)"):
        multi_lora_linear(*multi.values(), dropout_p=[0.1, p])
    with pytest.raises(ValueError, match=r"^lora_dropout must be a float in \[0, 1\)"):
        LoRALinear(8, 4, lora_dropout=p)
    with pytest.raises(ValueError, match=r"^lora_dropout must be a float in \[0, 1\)"):
        MultiLoRALinear(8, 4).add_adapter("a", 2, lora_dropout=p)


@pytest.mark.parametrize("seed", [-1, 2**31, 1.0, True, "1"])
def test_bad_seed(seed):
    inputs = lora_inputs(2, 8, 4, 2, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match=r"^seed must be None or an int"):
        fused_lora.lora_linear(*inputs.values(), 1.0, dropout_p=0.1, seed=seed)
    with pytest.raises(ValueError, match=r"^seed must be None or an int"):
        dropout_mask((4, 4), 0.1, seed, DEVICE)
    multi = multi_inputs(2, 8, 4, [2], torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match=r"^seed must be None or an int"):
        multi_lora_linear(*multi.values(), dropout_p=0.1, seed=seed)
