"""The fused forward kernel's launcher against the float64 reference:
poisoned outputs, inputs padded in NaN, odd shapes, every dtype pair, both
interpreter configs (on a GPU: the autotuned kernel)."""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_matches_reference, lora_inputs, padded, poisoned

from fused_lora import triton_backend
from fused_lora.kernels import configs
from fused_lora.kernels.common import INTERPRETED
from fused_lora.reference import lora_linear_reference

# (x / W dtype, adapter dtype): same dtype, and PEFT's fp32 adapters on 16-bit x.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]
PAIR_IDS = ["fp32", "fp16", "bf16", "bf16-fp32A", "fp16-fp32A"]
# (M, K, N, r): no dimension a multiple of the blocks, r = 1 and r not a
# power of two, M = 0 and 1.
SHAPES = [(0, 48, 16, 4), (1, 48, 100, 1), (7, 100, 48, 16), (33, 257, 100, 33), (130, 100, 257, 5)]
SMALL_SHAPES = [(1, 16, 16, 1), (33, 48, 33, 7), (20, 37, 70, 17)]  # cheap enough for 16^3 tiles
INTERPRETER_CONFIGS = ["large", "small"] if INTERPRETED else ["autotuned"]


def run_forward(m, k, n, r, dtype, adapter_dtype, bias=True, scaling=0.75):
    inputs = lora_inputs(m, k, n, r, dtype, adapter_dtype, device=DEVICE, bias=bias)
    padded_inputs = {name: None if t is None else padded(t) for name, t in inputs.items()}
    out = poisoned((m, n), dtype, DEVICE)
    h_out = poisoned((m, r), adapter_dtype, DEVICE)
    y, h = triton_backend.forward(*padded_inputs.values(), scaling, out=out, h_out=h_out)
    assert y is out and h is h_out
    ref = lora_linear_reference(*inputs.values(), scaling)
    ref_h = inputs["x"].double().cpu() @ inputs["lora_a"].double().cpu().t()
    return y, h, ref, ref_h, inputs


@pytest.fixture(params=INTERPRETER_CONFIGS)
def config(request):
    if request.param == "autotuned":
        yield
    else:
        with configs.use_interpreter_config(request.param):
            yield request.param


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(shape, dtype, adapter_dtype, bias):
    with configs.use_interpreter_config("large"):
        y, h, ref, ref_h, _ = run_forward(*shape, dtype, adapter_dtype, bias)
    assert_matches_reference(y, ref, dtype, name="y")
    assert_matches_reference(h, ref_h, adapter_dtype, name="H")


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_forward_multi_tile(shape, dtype, adapter_dtype, config):
    """16^3 tiles: several K iterations, several tiles per row and column,
    edge masks on every side."""
    y, h, ref, ref_h, _ = run_forward(*shape, dtype, adapter_dtype)
    assert_matches_reference(y, ref, dtype, name="y")
    assert_matches_reference(h, ref_h, adapter_dtype, name="H")


@pytest.mark.parametrize("r", [64, 128, 256])
def test_forward_large_rank(r):
    y, h, ref, ref_h, _ = run_forward(33, 100, 70, r, torch.bfloat16, torch.float32)
    assert_matches_reference(y, ref, torch.bfloat16, name="y")
    assert_matches_reference(h, ref_h, torch.float32, name="H")


def test_forward_error_near_torch():
    """Second look (TESTING.md): the kernel's bf16 error is within about 2x
    of PyTorch's own bf16 computation of the same layer."""
    y, _, ref, _, inputs = run_forward(64, 257, 130, 16, torch.bfloat16, torch.bfloat16)
    x, w, b, a, bb = inputs.values()
    torch_y = torch.nn.functional.linear(x, w, b) + 0.75 * ((x @ a.t()) @ bb.t())
    ours = (y.double().cpu() - ref).abs().max()
    theirs = (torch_y.double().cpu() - ref).abs().max()
    assert ours <= 2 * theirs, f"kernel error {ours:.3g} vs torch's {theirs:.3g}"


def test_forward_zero_k_gives_bias():
    y, h, ref, ref_h, _ = run_forward(5, 0, 7, 3, torch.float32, torch.float32)
    assert_matches_reference(y, ref, torch.float32, name="y")
    assert_matches_reference(h, ref_h, torch.float32, name="H")


@pytest.mark.skipif(DEVICE == "cuda", reason="needs 4 GiB of host memory; the interpreter shows int32 wrap-around")
def test_forward_offsets_past_int32():
    """Rows 2^20 elements apart: row 2048 starts at element 2^31, past int32.
    Without int64 offsets the kernel would read and write wrapped addresses."""
    m, k, n, r, row_stride = 2049, 16, 16, 4, 2**20
    inputs = lora_inputs(m, k, n, r, torch.float16, device=DEVICE)
    storage = torch.empty(row_stride * m, dtype=torch.float16)
    x = storage.as_strided((m, k), (row_stride, 1))
    x.copy_(inputs["x"])
    y_storage = torch.full((row_stride * m,), float("nan"), dtype=torch.float16)
    out = y_storage.as_strided((m, n), (row_stride, 1))
    h_out = poisoned((m, r), torch.float16, DEVICE)
    triton_backend.forward(
        x, inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"], 0.5, out=out, h_out=h_out
    )
    ref = lora_linear_reference(*inputs.values(), 0.5)
    assert_matches_reference(out, ref, torch.float16, name="y")


@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS[:3], ids=PAIR_IDS[:3])
def test_base_gemm_alone(dtype, adapter_dtype):
    """lora_a = lora_b = None: the kernel's own GEMM (the benchmark's
    triton-base row) gives x W^T + bias."""
    from fused_lora.kernels.forward import lora_forward

    inputs = lora_inputs(33, 100, 70, 4, dtype, adapter_dtype, device=DEVICE)
    out = poisoned((33, 70), dtype, DEVICE)
    with configs.use_interpreter_config("small"):
        y, h = lora_forward(padded(inputs["x"]), padded(inputs["weight"]), inputs["bias"], None, None, 1.0,
                            base_precision="ieee", lora_precision="ieee", out=out)  # fmt: skip
    assert y is out and h is None
    ref = torch.nn.functional.linear(*(inputs[n].double().cpu() for n in ("x", "weight", "bias")))
    assert_matches_reference(y, ref, dtype, name="y")
