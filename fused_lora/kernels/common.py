"""What every kernel file shares: whether Triton interprets, and the
interpreter's bf16 workaround."""

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether @triton.jit functions run
# interpreted (TRITON_INTERPRET=1 when the kernels were imported).
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def dot_operand(t, UPCAST: tl.constexpr):
    """A tile as `tl.dot` should see it. The interpreter multiplies bf16 bit
    patterns as integers (triton-lang/triton#11584), so when interpreted the
    16-bit operands go to fp32; compiled kernels keep their native MMA dtype."""
    if UPCAST and t.dtype.primitive_bitwidth == 16:
        return t.to(tl.float32)
    else:
        return t


def accumulator_dtype(dtype: torch.dtype):
    """fp32 accumulation, except float64 (interpreter only), whose dot needs
    a float64 accumulator: the interpreter returns garbage for fp64 operands
    into an fp32 one."""
    return tl.float64 if dtype == torch.float64 else tl.float32
