"""Quantized frozen base weights (NF4, plain and with nested statistics; FP8
e4m3 with block and per-tensor scales): the kernels' tile-by-tile decode
against bitsandbytes' own dequantize and against `QuantizedWeight.dequantize`,
every e4m3 bit pattern, quantize_nf4 / quantize_fp8 within their
quantization error, and lora_linear / multi_lora_linear on a QuantizedWeight
(y and every gradient against float64 references built from `dequantize()`)
on both backends, every Triton candidate, both interpreter configs, every
dtype pair, dropout and many adapters; the input checks and torch.compile."""

import dataclasses

import pytest
import torch
from conftest import DEVICE
from helpers import DTYPE_PAIRS, PAIR_IDS, assert_matches_reference, f64, randn
from torch._dynamo.testing import CompileCounterWithBackend

import fused_lora
from fused_lora import dropout_mask
from fused_lora.backends import tuning
from fused_lora.kernels.common import INTERPRETED
from fused_lora.kernels.gemm import lora_gemm
from fused_lora.quantized import FP8_MAX, NF4_LEVELS, QuantizedWeight, quantize_fp8, quantize_nf4

FORMATS = ("nf4", "nf4-nested", "fp8-block", "fp8-tensor")


def nested(weight: QuantizedWeight, nested_blocksize: int = 16) -> QuantizedWeight:
    """An NF4 weight with its absmax stored as bitsandbytes' compress_statistics
    stores it: uint8 indexes into a 256-entry table (here a sorted random one,
    so that a wrong index shows), scaled per block of `nested_blocksize`
    absmax values, plus an offset (their mean). A small nested_blocksize, so
    that small weights have several nested blocks."""
    absmax = weight.absmax.float()
    offset = absmax.mean()
    centered = absmax - offset
    blocks = -(-absmax.numel() // nested_blocksize)
    padded = torch.zeros(blocks * nested_blocksize, device=absmax.device)
    padded[: absmax.numel()] = centered
    scale = padded.reshape(blocks, nested_blocksize).abs().amax(1).clamp_min(1e-12)
    code = torch.sort(torch.rand(256, device=absmax.device) * 2 - 1).values
    code[0], code[-1] = -1.0, 1.0  # the extremes stay representable
    normalized = centered / scale.repeat_interleave(nested_blocksize)[: absmax.numel()]
    indexes = (normalized[:, None] - code).abs().argmin(1).to(torch.uint8)
    return dataclasses.replace(
        weight,
        absmax=indexes,
        nested_absmax=scale,
        nested_code=code,
        nested_offset=offset.reshape(()),
        nested_blocksize=nested_blocksize,
    )


def quantized(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    """weight (N, K) as a QuantizedWeight of `fmt` (one of FORMATS) in weight's dtype."""
    if fmt == "nf4":
        return quantize_nf4(weight)
    if fmt == "nf4-nested":
        return nested(quantize_nf4(weight))
    if fmt == "fp8-block":
        q = quantize_fp8(weight)
        # Block scales several-fold apart: a scale read from the wrong block is far outside the tolerance.
        q.scale = q.scale * (1 + 3 * torch.rand(q.scale.shape, device=q.scale.device))
        return q
    scale = weight.detach().abs().amax().float() / FP8_MAX
    data = (weight.detach().float() / scale).to(torch.float8_e4m3fn)
    return QuantizedWeight("fp8", data, tuple(weight.shape), weight.dtype, scale=scale)


def weight_tensors(q: QuantizedWeight) -> list[torch.Tensor]:
    """Every tensor a QuantizedWeight holds: its data and statistics."""
    return [t for t in (q.data, *q.parts()) if t is not None]


# ---- the decode: bitsandbytes' layout, bit for bit


def rounded_as_the_kernels_round(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp32 W rounded to dtype as the kernels' decode rounds it: to nearest,
    except that the interpreter truncates fp32 to bf16 (docs/testing.md)."""
    if INTERPRETED and dtype == torch.bfloat16:
        return (w.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low 16 bits zero
    return w.to(dtype)


def kernel_decode(q: QuantizedWeight, dx: bool) -> torch.Tensor:
    """W (N, K) as the GEMM kernel decodes it: the plain GEMM of an identity
    with W^T (forward) or W (dX). Every output element is one product by 1,
    summed with exact zeros: the decoded value itself, rounded to W's dtype."""
    n, k = q.shape
    eye = torch.eye(n if dx else k, dtype=q.dtype, device=q.device)
    y, _ = lora_gemm(eye, q, None, None, dx=dx, compute_y=True, base_precision="ieee", lora_precision="ieee")
    return y if dx else y.t()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "nested"])
# K = 100: blocks of 64 span two rows. Not K = 48: bitsandbytes 0.50.2 on CPU dequantizes wrongly when
# K % 16 == 0 and K % 64 != 0 (relative error 0.2); K = 48 is tested against our own decode below, and odd
# N * K against bitsandbytes' packing (test_quantize_nf4_is_bitsandbytes_layout).
@pytest.mark.parametrize("k", [64, 128, 100])
def test_decode_matches_bitsandbytes(dtype, compress_statistics, k):
    """A weight quantized by bitsandbytes (blocksize 64), wrapped as a
    QuantizedWeight from its QuantState: dequantize() equals bitsandbytes'
    dequantize_4bit bit for bit, and so does the kernels' fp32 decode rounded
    to the dtype (the kernels' own rounding: test_kernel_decode_equals_dequantize)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = randn(33, k, dtype=dtype, device=DEVICE)
    packed, state = functional.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=compress_statistics
    )
    statistics = {}
    if compress_statistics:
        statistics = dict(
            nested_absmax=state.state2.absmax,
            nested_code=state.state2.code,
            nested_offset=torch.as_tensor(state.offset, device=DEVICE).reshape(()),
            nested_blocksize=state.state2.blocksize,
        )
    q = QuantizedWeight("nf4", packed.reshape(-1), (33, k), dtype, absmax=state.absmax, code=state.code,
                        blocksize=state.blocksize, **statistics)  # fmt: skip
    assert q.nested == compress_statistics
    expected = functional.dequantize_4bit(packed, state)
    assert expected.dtype == dtype
    torch.testing.assert_close(q.dequantize(), expected, rtol=0, atol=0)
    decoded = kernel_decode(dataclasses.replace(q, dtype=torch.float32), dx=True)
    torch.testing.assert_close(decoded.to(dtype), expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(33, 64), (3, 100), (3, 37), (5, 48)], ids=str)
def test_quantize_nf4_is_bitsandbytes_layout(shape):
    """quantize_nf4 packs the codes and absmax exactly as bitsandbytes'
    quantize_4bit does (the unused low nibble of an odd N*K aside)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = randn(*shape, device=DEVICE)
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quantize_nf4(weight)
    packed = packed.reshape(-1)
    assert q.data.shape == packed.shape and q.data.dtype == torch.uint8
    odd = (shape[0] * shape[1]) % 2
    torch.testing.assert_close(q.data[: packed.numel() - odd], packed[: packed.numel() - odd], rtol=0, atol=0)
    if odd:
        assert (q.data[-1] >> 4) == (packed[-1] >> 4)
    torch.testing.assert_close(q.absmax, state.absmax, rtol=0, atol=0)
    torch.testing.assert_close(q.code, state.code.float(), rtol=0, atol=0)


# K = 48 and 37: blocks of 64 span rows; 7 x 37: the last byte half used; FP8: 2 x 2 scale blocks.
DECODE_CASES = [(fmt, shape) for fmt in FORMATS for shape in ((33, 48), (7, 37))] + [("fp8-block", (130, 130))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("fmt", "shape"), DECODE_CASES, ids=[f"{f}-{n}x{k}" for f, (n, k) in DECODE_CASES])
def test_kernel_decode_equals_dequantize(fmt, shape, dtype):
    """The kernels' decode equals dequantize() exactly, in both addressings,
    for K not a multiple of the block (a block spans two rows), odd N*K and
    FP8 scale blocks in both dimensions."""
    q = quantized(randn(*shape, dtype=dtype, device=DEVICE), fmt)
    assert q.dequantize().dtype == dtype and tuple(q.dequantize().shape) == shape
    expected = rounded_as_the_kernels_round(q.dequantize(torch.float32), dtype)
    torch.testing.assert_close(kernel_decode(q, dx=False), expected, rtol=0, atol=0)
    torch.testing.assert_close(kernel_decode(q, dx=True), expected, rtol=0, atol=0)


@pytest.mark.parametrize("per_tensor", [False, True], ids=["block", "tensor"])
def test_every_e4m3_bit_pattern(per_tensor):
    """The kernels decode each of the 256 float8_e4m3fn bit patterns (normal,
    subnormal, +-0, NaN) as torch converts it to float32, in both
    addressings: W (256, 1) through the forward and (1, 256) through dX, each
    output one product by x = 1 (a contraction of length 1: no NaN spreads)."""
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(DEVICE)
    expected = bits.float()
    for shape, dx in (((256, 1), False), ((1, 256), True)):
        blocks = (-(-shape[0] // 128), -(-shape[1] // 128))
        scale = torch.ones((), device=DEVICE) if per_tensor else torch.ones(blocks, device=DEVICE)
        q = QuantizedWeight("fp8", bits.reshape(shape), shape, torch.float32, scale=scale)
        y, _ = lora_gemm(torch.ones(1, 1, device=DEVICE), q, None, None, dx=dx, compute_y=True,
                         base_precision="ieee", lora_precision="ieee")  # fmt: skip
        torch.testing.assert_close(y.reshape(-1), expected, rtol=0, atol=0, equal_nan=True)
    assert expected.isnan().sum() == 2  # 0x7F and 0xFF


@pytest.mark.parametrize("fmt", FORMATS)
def test_spec_round_trip(fmt):
    """How the custom ops carry a QuantizedWeight (its data, spec() and
    parts()) rebuilds the same weight."""
    q = quantized(randn(7, 37, dtype=torch.bfloat16, device=DEVICE), fmt)
    rebuilt = QuantizedWeight.from_spec(q.data, q.spec(), q.parts())
    assert (rebuilt.format, rebuilt.shape, rebuilt.dtype, rebuilt.nested) == (q.format, q.shape, q.dtype, q.nested)
    if q.format == "nf4":
        assert (rebuilt.blocksize, rebuilt.nested_blocksize) == (q.blocksize, q.nested_blocksize)
    torch.testing.assert_close(rebuilt.dequantize(), q.dequantize(), rtol=0, atol=0)


# ---- quantize_nf4 / quantize_fp8: within their quantization error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("blocksize", [64, 32])
def test_quantize_nf4_round_trip(dtype, blocksize):
    """Every element decodes to the NF4 level nearest to it (scaled by its
    block's absmax), each block's absmax is its largest |element|, and a block
    spans rows (K = 37)."""
    weight = randn(33, 37, dtype=dtype, device=DEVICE)
    q = quantize_nf4(weight, blocksize=blocksize)
    assert q.data.numel() == -(-33 * 37 // 2) and q.absmax.numel() == -(-33 * 37 // blocksize)
    w = f64(weight).reshape(-1)
    absmax = q.absmax.double().cpu().repeat_interleave(blocksize)[: w.numel()]
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    nearest = (w[:, None] - levels * absmax[:, None]).abs().amin(1)
    error = (f64(q.dequantize(torch.float64)).reshape(-1) - w).abs()
    assert (error <= nearest + 1e-6 * absmax).all()
    block_max = torch.stack([block.amax() for block in w.abs().split(blocksize)])
    torch.testing.assert_close(q.absmax.cpu().double(), block_max, rtol=0, atol=0)
    assert q.dequantize().dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantize_fp8_round_trip(dtype):
    """Within e4m3's rounding: 2^-4 relative for normal values, half a
    subnormal step (2^-10 of the block's scale) below; each 128 x 128 block's
    scale is its absmax / 448; N and K not multiples of 128."""
    weight = randn(130, 200, dtype=dtype, device=DEVICE)
    weight[:, 128:] *= 10  # blocks of different magnitudes
    q = quantize_fp8(weight)
    assert q.data.dtype == torch.float8_e4m3fn and tuple(q.scale.shape) == (2, 2)
    w = f64(weight)
    blocks = [[w[i : i + 128, j : j + 128].abs().amax() for j in (0, 128)] for i in (0, 128)]
    torch.testing.assert_close(q.scale.cpu().double(), torch.tensor(blocks, dtype=torch.float64) / FP8_MAX)
    scale = q.scale.cpu().double().repeat_interleave(128, 0)[:130].repeat_interleave(128, 1)[:, :200]
    error = (f64(q.dequantize(torch.float32)) - w).abs()
    assert (error <= 2**-4 * w.abs() + 2**-10 * scale + 1e-7 * scale).all()
    assert q.dequantize().dtype == dtype


# ---- lora_linear and multi_lora_linear on a quantized base


def reference(x, weight, bias, lora_a, lora_b, scalings, adapter_ids, factors):
    """y in float64: x W^T + bias + s_a (d A_a^T) B_a^T on the rows of adapter
    a (adapter_ids; -1: the base only), d = x * factors (the dropout mask / (1 - p))."""
    y = x @ weight.t() + bias
    d = x * factors
    for a, (down, up) in enumerate(zip(lora_a, lora_b, strict=True)):
        rows = (adapter_ids == a).to(x.dtype)[:, None]
        y = y + rows * scalings[a] * ((d @ down.t()) @ up.t())
    return y


def split(tensors, count):
    """[x, bias, A_0.., B_0..] -> (x, bias, [A_a], [B_a]) for `count` adapters."""
    return tensors[0], tensors[1], tensors[2 : 2 + count], tensors[2 + count :]


def check(q, x, bias, lora_a, lora_b, scalings, adapter_ids=None, dropout_p=0.0, seed=None):
    """lora_linear (adapter_ids None: one adapter) or multi_lora_linear on the
    QuantizedWeight q against the float64 reference built from q.dequantize():
    y and the gradients of x, bias, every A and every B; the weight's tensors
    get no gradient."""
    count = len(lora_a)
    leaves = [t.detach().clone().requires_grad_() for t in (x, bias, *lora_a, *lora_b)]
    x_, bias_, lora_a_, lora_b_ = split(leaves, count)
    kwargs = dict(dropout_p=dropout_p, seed=seed)
    if adapter_ids is None:
        y = fused_lora.lora_linear(x_, q, bias_, lora_a_[0], lora_b_[0], scalings[0], **kwargs)
    else:
        y = fused_lora.multi_lora_linear(x_, q, bias_, lora_a_, lora_b_, scalings, adapter_ids, **kwargs)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], q.shape[0])
    factors = torch.ones(x.shape, dtype=torch.float64)
    if dropout_p:
        factors = dropout_mask(x.shape, dropout_p, seed, device=DEVICE).cpu().double() / (1 - dropout_p)
    ids = torch.zeros(x.shape[0], dtype=torch.int64) if adapter_ids is None else adapter_ids.cpu()
    ref_leaves = [f64(t).requires_grad_() for t in leaves]
    ref_x, ref_bias, ref_a, ref_b = split(ref_leaves, count)
    ref_y = reference(ref_x, f64(q.dequantize()), ref_bias, ref_a, ref_b, scalings, ids, factors)
    assert_matches_reference(y, ref_y, x.dtype, name="y")
    dy = randn(*y.shape, dtype=y.dtype, device=DEVICE)
    y.backward(dy)
    ref_y.backward(f64(dy))
    names = ["x", "bias", *(f"lora_a[{a}]" for a in range(count)), *(f"lora_b[{a}]" for a in range(count))]
    for name, ours, theirs in zip(names, leaves, ref_leaves, strict=True):
        assert_matches_reference(ours.grad, theirs.grad, ours.dtype, "gradients", name=f"d{name}")
    assert all(t.grad is None for t in weight_tensors(q))


def problem(m, k, n, ranks, fmt, dtype=torch.float32, adapter_dtype=None):
    """A QuantizedWeight (N, K) of fmt and fresh random x (M, K), bias (N,),
    adapters A_a (r_a, K), B_a (N, r_a) (B random, never a fresh adapter's zeros)."""
    adapter_dtype = adapter_dtype or dtype
    q = quantized(randn(n, k, scale=k**-0.5, dtype=dtype, device=DEVICE), fmt)
    x = randn(m, k, dtype=dtype, device=DEVICE)
    bias = randn(n, dtype=dtype, device=DEVICE)
    lora_a = [randn(r, k, scale=k**-0.5, dtype=adapter_dtype, device=DEVICE) for r in ranks]
    lora_b = [randn(n, r, scale=r**-0.5, dtype=adapter_dtype, device=DEVICE) for r in ranks]
    return q, x, bias, lora_a, lora_b


# (format, (M, K, N, r)), M <= 16 so that split-K is a candidate: a block of 64 spanning rows with odd N*K
# (33 x 37), several nested blocks (33 x 100), FP8 scale blocks along K (K = 130) and a per-tensor scale.
CANDIDATE_CASES = [("nf4", (5, 37, 33, 4)), ("nf4-nested", (7, 100, 33, 3)), ("fp8-block", (3, 130, 48, 5)),
                   ("fp8-tensor", (6, 48, 100, 2))]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("candidate", ["fused", "prepass", "splitk", "composed"])
@pytest.mark.parametrize(("fmt", "shape"), CANDIDATE_CASES, ids=[c[0] for c in CANDIDATE_CASES])
def test_every_candidate(fmt, shape, candidate, config, monkeypatch):
    """Each Triton candidate of the forward and of dX (forced, and checked to
    have run) decodes the quantized base right, on both interpreter configs."""
    chosen = []

    def choose(kind, *args):
        chosen.append((kind, name := real_choose(kind, *args)))
        return name

    real_choose = tuning.choose
    monkeypatch.setattr(tuning, "choose", choose)
    m, k, n, r = shape
    q, x, bias, lora_a, lora_b = problem(m, k, n, [r], fmt)
    with fused_lora.set_backend("triton"), tuning.use(forward=candidate, grad_x=candidate):
        check(q, x, bias, lora_a, lora_b, [1.5])
    assert ("forward", candidate) in chosen and ("grad_x", candidate) in chosen


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("dtype", "adapter_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
def test_dtypes(fmt, dtype, adapter_dtype, backend):
    """fp32, fp16 and bf16 x (the weight decoded into x's dtype), with adapters
    of x's dtype or fp32."""
    q, x, bias, lora_a, lora_b = problem(21, 100, 37, [6], fmt, dtype, adapter_dtype)
    check(q, x, bias, lora_a, lora_b, [0.75])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("many", [False, True], ids=["one", "many"])
def test_dropout_and_many_adapters(fmt, many, backend):
    """Dropout (the reference rebuilt from dropout_mask) with one adapter, and
    many adapters of different ranks with rows of the base alone; N past an
    FP8 scale block."""
    q, x, bias, lora_a, lora_b = problem(21, 48, 130, [4, 7, 2] if many else [5], fmt, torch.bfloat16, torch.float32)
    ids = torch.cat([torch.arange(-1, 3), torch.randint(-1, 3, (17,))])[torch.randperm(21)].to(DEVICE) if many else None
    check(q, x, bias, lora_a, lora_b, [0.5, 1.25, 2.0][: len(lora_a)], ids, dropout_p=0.3, seed=1234)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_batch_default_candidate(fmt, backend):
    """A decode batch (M <= 16, where split-K is eligible) with the candidate
    the heuristic picks: it must read a QuantizedWeight's size, not a tensor's."""
    q, x, bias, lora_a, lora_b = problem(4, 100, 33, [3], fmt)
    check(q, x, bias, lora_a, lora_b, [1.0])


def test_dtype_and_shape_errors():
    """A weight of another dtype than x raises TypeError naming weight; x of
    the wrong K raises ValueError; both before any kernel runs."""
    q, x, bias, lora_a, lora_b = problem(5, 48, 33, [2], "nf4", torch.bfloat16)
    with pytest.raises(TypeError, match="weight"):
        fused_lora.lora_linear(x.float(), q, None, lora_a[0].float(), lora_b[0].float(), 1.0)
    with pytest.raises(TypeError, match="weight"):
        fused_lora.multi_lora_linear(x.float(), q, None, [a.float() for a in lora_a], [b.float() for b in lora_b],
                                     [1.0], torch.zeros(5, dtype=torch.int64))  # fmt: skip
    with pytest.raises(ValueError, match="x must have shape"):
        fused_lora.lora_linear(x[:, :47], q, bias, lora_a[0], lora_b[0], 1.0)


def test_weight_is_frozen():
    """A QuantizedWeight gets no gradient: NF4's packed bytes cannot require
    grad, and FP8 data set to require grad is refused, naming weight (its
    gradient would be dY^T x cast to e4m3, which is not the gradient of
    anything the layer computes)."""
    q, x, bias, lora_a, lora_b = problem(20, 48, 33, [2], "nf4")
    with pytest.raises(RuntimeError):
        q.data.requires_grad_()
    q, *_ = problem(20, 48, 33, [2], "fp8-block")
    q.data.requires_grad_()
    with pytest.raises((TypeError, ValueError), match="weight"):
        fused_lora.lora_linear(x.requires_grad_(), q, bias, lora_a[0], lora_b[0], 1.0)


@pytest.mark.parametrize("fmt", ["nf4-nested", "fp8-block"])
def test_torch_compile(fmt, backend):
    """torch.compile(fullgraph=True) of a function calling lora_linear with a
    QuantizedWeight: one graph, no break, y and gradients equal to eager."""
    torch._dynamo.reset()
    q, x, bias, lora_a, lora_b = problem(20, 48, 33, [3], fmt)

    def f(x, q, a, b):
        return fused_lora.lora_linear(x, q, bias, a, b, 1.5).square().sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    results = []
    for fn in (compiled, f):
        leaves = [t.detach().clone().requires_grad_() for t in (x, lora_a[0], lora_b[0])]
        loss = fn(leaves[0], q, *leaves[1:])
        loss.backward()
        results.append([loss, *(t.grad for t in leaves)])
    assert counter.frame_count == 1
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()
