"""Decoding a quantized base weight tile by tile, in registers, inside the
GEMM's K loop (fused_lora/quantized.py describes the formats).

A tile is addressed by the flat index of each element in the row-major
(N, K) weight, f = k_idx * stride_wk + n_idx * stride_wn with the dense
strides of that layout, as the dense GEMM addresses W^T (forward) or W (dX):
NF4's nibble, byte and absmax block follow from f. FP8 needs (n, k) for its
128 x 128 scale block. e4m3 is decoded from its bits with integer
arithmetic (any architecture, and the interpreter), or converted natively
where the GPU has the type (NATIVE_FP8: sm_89 and newer).
"""

import triton
import triton.language as tl

DENSE = tl.constexpr(0)
NF4 = tl.constexpr(1)
NF4_NESTED = tl.constexpr(2)
FP8 = tl.constexpr(3)
FP8_PER_TENSOR = tl.constexpr(4)
FP8_BLOCK = tl.constexpr(128)


@triton.jit
def e4m3_to_float(bits):
    """float8_e4m3fn bits (uint8) to fp32: 1 sign, 4 exponent (bias 7) and 3
    mantissa bits; exponent 0 is subnormal (m * 2^-9); 0x7F / 0xFF are NaN."""
    b = bits.to(tl.int32)
    sign = (b >> 7) & 1
    e = (b >> 3) & 15
    m = b & 7
    normal = ((sign << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    subnormal = m.to(tl.float32) * 0.001953125
    value = tl.where(e == 0, tl.where(sign == 1, -subnormal, subnormal), normal)
    return tl.where((e == 15) & (m == 7), float("nan"), value)


@triton.jit
def weight_tile(
    w_ptr, q1_ptr, q2_ptr, q3_ptr, q4_ptr, q5_ptr, k_idx, n_idx, mask, stride_wk, stride_wn, scale_cols,
    FORMAT: tl.constexpr, BLOCK: tl.constexpr, BLOCK2: tl.constexpr, DX: tl.constexpr,
    NATIVE_FP8: tl.constexpr, OUT_DTYPE: tl.constexpr,
):  # fmt: skip
    """The (len(k_idx), len(n_idx)) tile of W^T (forward) or W (dX) in
    OUT_DTYPE, decoded from FORMAT; masked elements are 0. q1..q5: NF4's
    absmax, code, nested absmax, nested code, nested offset; FP8's scale."""
    f = k_idx.to(tl.int64)[:, None] * stride_wk + n_idx.to(tl.int64)[None, :] * stride_wn
    if FORMAT == FP8 or FORMAT == FP8_PER_TENSOR:
        bits = tl.load(w_ptr + f, mask=mask, other=0)
        if NATIVE_FP8:
            w = bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            w = e4m3_to_float(bits)
        if FORMAT == FP8:
            if DX:  # the tile's rows run along N (W's rows), its columns along K
                n, k = k_idx, n_idx
                scale_idx = (n // FP8_BLOCK)[:, None] * scale_cols + (k // FP8_BLOCK)[None, :]
            else:
                k, n = k_idx, n_idx
                scale_idx = (n // FP8_BLOCK)[None, :] * scale_cols + (k // FP8_BLOCK)[:, None]
            w = w * tl.load(q1_ptr + scale_idx, mask=mask, other=0.0)
        else:
            w = w * tl.load(q1_ptr)
    else:
        byte = tl.load(w_ptr + f // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((1 - f % 2) * 4).to(tl.int32)) & 15  # the first element sits in the high nibble
        block = f // BLOCK
        if FORMAT == NF4_NESTED:
            absmax_code = tl.load(q1_ptr + block, mask=mask, other=0).to(tl.int32)
            absmax = tl.load(q4_ptr + absmax_code) * tl.load(q3_ptr + block // BLOCK2, mask=mask, other=0.0)
            absmax += tl.load(q5_ptr)
        else:
            absmax = tl.load(q1_ptr + block, mask=mask, other=0.0)
        w = tl.load(q2_ptr + code) * absmax
    return tl.where(mask, w, 0.0).to(OUT_DTYPE)
