"""The backward kernels' launchers against float64 formulas: dX with G, and
the split-M reductions for dA and dB (stored directly and through atomics)."""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_matches_reference, lora_inputs, padded, poisoned
from test_forward import DTYPE_PAIRS, INTERPRETER_CONFIGS, PAIR_IDS, SHAPES, SMALL_SHAPES

from fused_lora import triton_backend
from fused_lora.kernels import configs
from fused_lora.kernels.common import INTERPRETED


def f64(t):
    return t.detach().to("cpu", torch.float64)


def run_dx(m, k, n, r, dtype, adapter_dtype, compute_dx=True, scaling=0.75):
    inputs = lora_inputs(m, k, n, r, dtype, adapter_dtype, device=DEVICE, bias=False)
    dy = torch.randn(m, n, dtype=torch.float64).to(DEVICE, dtype)
    out = poisoned((m, k), dtype, DEVICE) if compute_dx else None
    g_out = poisoned((m, r), adapter_dtype, DEVICE)
    w, a, b = (padded(inputs[name]) for name in ("weight", "lora_a", "lora_b"))
    dx, g = triton_backend.backward_dx(padded(dy), w, a, b, scaling, compute_dx=compute_dx, out=out, g_out=g_out)
    assert g is g_out and dx is out
    g_ref = scaling * f64(dy) @ f64(inputs["lora_b"])
    dx_ref = f64(dy) @ f64(inputs["weight"]) + g_ref @ f64(inputs["lora_a"])
    return dx, g, dx_ref, g_ref


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dx_matches_reference(shape, dtype, adapter_dtype):
    with configs.use_interpreter_config("large"):
        dx, g, dx_ref, g_ref = run_dx(*shape, dtype, adapter_dtype)
    assert_matches_reference(dx, dx_ref, dtype, "gradients", name="dX")
    assert_matches_reference(g, g_ref, adapter_dtype, "gradients", name="G")


@pytest.fixture(params=INTERPRETER_CONFIGS)
def config(request):
    if request.param == "autotuned":
        yield
    else:
        with configs.use_interpreter_config(request.param):
            yield request.param


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_dx_multi_tile(shape, dtype, adapter_dtype, config):
    dx, g, dx_ref, g_ref = run_dx(*shape, dtype, adapter_dtype)
    assert_matches_reference(dx, dx_ref, dtype, "gradients", name="dX")
    assert_matches_reference(g, g_ref, adapter_dtype, "gradients", name="G")


@pytest.mark.parametrize("shape", [(33, 100, 48, 16), (20, 37, 70, 17)], ids=str)
def test_g_without_dx(shape, config):
    """x needs no gradient but A does: the kernel forms G alone."""
    dx, g, _, g_ref = run_dx(*shape, torch.bfloat16, torch.float32, compute_dx=False)
    assert dx is None
    assert_matches_reference(g, g_ref, torch.float32, "gradients", name="G")


@pytest.mark.parametrize("r", [64, 256])
def test_dx_large_rank(r):
    dx, g, dx_ref, g_ref = run_dx(33, 100, 70, r, torch.bfloat16, torch.bfloat16)
    assert_matches_reference(dx, dx_ref, torch.bfloat16, "gradients", name="dX")
    assert_matches_reference(g, g_ref, torch.bfloat16, "gradients", name="G")


# (M, P, r): M past one split of either interpreter config (atomic partial
# sums) and within one (a direct store); M = 0 gives zeros.
REDUCTION_SHAPES = [(0, 48, 4), (1, 100, 1), (33, 257, 33), (300, 48, 16), (130, 70, 256)]


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape", REDUCTION_SHAPES, ids=str)
def test_grad_a_and_b_match_reference(shape, dtype, adapter_dtype, config):
    m, p, r = shape
    if config == "small" and m * p * r > 300 * 48 * 16:
        pytest.skip("16^2 tiles interpret too slowly at this size; the large config covers it")
    wide = torch.randn(m, p, dtype=torch.float64).to(DEVICE, dtype)
    skinny = torch.randn(m, r, dtype=torch.float64).to(DEVICE, adapter_dtype)
    out_a = poisoned((r, p), adapter_dtype, DEVICE)
    out_b = poisoned((p, r), adapter_dtype, DEVICE)
    da = triton_backend.grad_a(padded(wide), padded(skinny), out=out_a)
    db = triton_backend.grad_b(padded(wide), padded(skinny), 0.75, out=out_b)
    assert da is out_a and db is out_b
    assert_matches_reference(da, f64(skinny).t() @ f64(wide), adapter_dtype, "gradients", name="dA")
    assert_matches_reference(db, 0.75 * f64(wide).t() @ f64(skinny), adapter_dtype, "gradients", name="dB")


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the split follows the SM count, not the interpreter configs")
def test_atomic_and_direct_reductions_agree():
    """M = 200 is one split of the large config (a direct store) and seven of
    the small one (atomic partial sums in fp32): both give the same dB."""
    m = 200
    assert configs.INTERPRETER_CONFIGS["small"]["split_m"] < m <= configs.INTERPRETER_CONFIGS["large"]["split_m"]
    wide = torch.randn(m, 40, device=DEVICE)
    skinny = torch.randn(m, 8, device=DEVICE)
    with configs.use_interpreter_config("small"):
        split = triton_backend.grad_b(wide, skinny, 1.0)
    with configs.use_interpreter_config("large"):
        whole = triton_backend.grad_b(wide, skinny, 1.0)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
