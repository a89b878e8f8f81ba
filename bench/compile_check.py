"""Compile the kernels for a GPU architecture without a GPU.

`triton.compile` with a `GPUTarget` builds PTX and a cubin on any machine;
`ptxas -v` (shipped with Triton) reports registers and spills, and
`metadata.shared` the shared memory, which the compiler does not check
against the device limit. Must run with TRITON_INTERPRET unset (an
interpreted kernel cannot be compiled): tests and the compile report run it
in a process of its own.

    python -m bench.compile_check [--suite]   # a JSON line per compile

Each kernel is compiled as its launcher specializes it at run time (unit
strides as constants, 16-byte alignment, the flags of one use), under a
variant name:

    forward / dx              the GEMM kernel, one adapter (dX: the transposed launch)
    multi_forward / multi_dx  the same, many adapters (rows sorted, ranks multiples of 8)
    reduce / multi_reduce     dA / dB
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_lora.kernels import configs, gemm, reduce
from fused_lora.kernels.common import INTERPRETED

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# (x / W dtype, adapter dtype) pairs the kernels accept on a GPU.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]
VARIANTS = ("forward", "dx", "multi_forward", "multi_dx", "reduce", "multi_reduce")
GEMM_VARIANTS = VARIANTS[:4]


@dataclasses.dataclass
class CompileResult:
    kernel: str
    arch: int
    dtype: str
    adapter_dtype: str
    r_pad: int
    config: str
    dropout: bool
    shared: int
    shared_limit: int
    registers: int
    spill_bytes: int
    wgmma: bool

    @property
    def fits(self) -> bool:
        return self.shared <= self.shared_limit


def _pointer(dtype):
    return "*" + DTYPE_NAMES[dtype]


# What Triton's launcher specializes on at run time for contiguous inputs of
# ordinary sizes: unit strides become constants, pointers and the other
# strides and sizes are multiples of 16. Without this the compiler cannot
# vectorise loads nor pipeline them, and the report would describe a kernel
# that never runs. The unit strides differ between the forward (W^T: W's
# rows along K) and the dX launch (W itself: rows along N).
UNIT_STRIDES = {
    "forward": {"stride_xk", "stride_wk", "stride_bias", "stride_yn", "stride_hr", "stride_dk", "stride_ur"},
    "dx": {"stride_xk", "stride_wn", "stride_yn", "stride_hr", "stride_dr", "stride_un"},
    "multi_forward": {"stride_xk", "stride_wk", "stride_bias", "stride_yn", "stride_hr"},
    "multi_dx": {"stride_xk", "stride_wn", "stride_yn", "stride_hr"},
    "reduce": {"stride_pp", "stride_qr", "stride_or"},
    "multi_reduce": {"stride_pp", "stride_qr", "stride_or"},
}
NOT_MULTIPLE_OF_16 = {"M", "R", "seed", "dropout_p", "NUM_ADAPTERS", "ROWS_PER_CHUNK"}


def _signature(variant, x_dtype, adapter_dtype):
    """(jit function, {arg: type}) for one variant."""
    p, q = _pointer(x_dtype), _pointer(adapter_dtype)
    scale = "*fp32"
    if variant in GEMM_VARIANTS:
        fn = gemm.lora_gemm_kernel
        pointers = dict(x_ptr=p, w_ptr=p, bias_ptr=p, y_ptr=p, h_ptr=q, down_ptr=q, up_ptr=q, scales_ptr=scale)
        pointers.update(order_ptr="*i32", ids_ptr="*i32", table_ptr="*i64", dropout_ptr=scale)
    else:
        fn = reduce.lora_reduce_kernel
        pointers = dict(p_ptr=p, q_ptr=q, out_ptr="*fp32", scales_ptr=scale, order_ptr="*i32", ids_ptr="*i32")
        pointers.update(starts_ptr="*i32", dropout_ptr=scale)
    signature = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr or name in UNIT_STRIDES[variant]:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "fp32" if name == "dropout_p" else "i32")
    return fn, signature


def _attrs(fn, signature):
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name] not in ("constexpr", "fp32") and name not in NOT_MULTIPLE_OF_16
    }


def _precision(dtype):
    return "tf32" if dtype == torch.float32 else "ieee"


def _constexprs(variant, x_dtype, adapter_dtype, r_pad, meta, dropout=False):
    flags = dict(UPCAST=False, ACC_DTYPE=tl.float32, R_PAD=r_pad, DROPOUT=dropout, MULTI=variant.startswith("multi"))
    if variant in GEMM_VARIANTS:
        flags.update(
            HAS_BIAS=True,
            HAS_LORA=True,
            COMPUTE_Y=True,
            DX=variant.endswith("dx"),
            SORTED=flags["MULTI"],
            RANK_MULTIPLE=8 if flags["MULTI"] else 1,  # ranks multiples of 8, as LoRA ranks usually are
            BASE_PRECISION=_precision(x_dtype),
            LORA_PRECISION=_precision(adapter_dtype),
        )
    else:
        flags.update(SCALED=not dropout, MODE=reduce.ATOMIC, PRECISION=_precision(adapter_dtype))
    flags.update({k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")})
    return flags


def _ptxas_report(ptx: str, arch: int):
    """(registers, spill bytes) from ptxas -v."""
    try:  # Triton picks a newer ptxas for sm_90 (3.9); older ones have one
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except ImportError:
        ptxas = triton.knobs.nvidia.ptxas.path
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm}", path, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def compile_kernel(variant, arch, x_dtype, adapter_dtype, config, r_pad=16, dropout=False) -> CompileResult:
    """Compile one variant for sm_<arch> with one config (and the dropout
    path when `dropout`)."""
    fn, signature = _signature(variant, x_dtype, adapter_dtype)
    constexprs = _constexprs(variant, x_dtype, adapter_dtype, r_pad, config.kwargs, dropout)
    constexprs.update({name: 1 for name in UNIT_STRIDES[variant]})
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=_attrs(fn, signature))
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    registers, spills = _ptxas_report(compiled.asm["ptx"], arch)
    return CompileResult(
        kernel=variant,
        arch=arch,
        dtype=DTYPE_NAMES[x_dtype],
        adapter_dtype=DTYPE_NAMES[adapter_dtype],
        r_pad=r_pad,
        dropout=dropout,
        config=" ".join(f"{k}={v}" for k, v in config.all_kwargs().items()),
        shared=compiled.metadata.shared,
        shared_limit=configs.SHARED_MEMORY_LIMIT[arch],
        registers=registers,
        spill_bytes=spills,
        wgmma="wgmma" in compiled.asm["ptx"],
    )


def kernel_configs(variant, r_pad=16, dtype=torch.bfloat16, adapter_dtype=None):
    """The autotune configs the launcher would try at this rank (after pruning)."""
    adapter_dtype = adapter_dtype or dtype
    if variant in GEMM_VARIANTS:
        multi = variant.startswith("multi")
        space = configs.MULTI_GEMM_CONFIGS
        return configs.prune_gemm(
            space, r_pad=r_pad * (2 if multi else 1), m=4096, wide_dtype=dtype, adapter_dtype=adapter_dtype
        )
    return configs.prune_reduce(configs.REDUCE_CONFIGS, r_pad=r_pad, wide_dtype=dtype, skinny_dtype=adapter_dtype)


def suite_cases():
    """What the test suite compiles: every variant x dtype pair x {sm_80,
    sm_90} with the first config (the one a GPU runs unless FUSED_LORA_TUNE=1) at
    r = 16 and 256, and with dropout for bf16; every config for bf16 on sm_90
    at r = 16 and r = 256."""
    for variant in VARIANTS:
        for arch in (80, 90):
            for x_dtype, adapter_dtype in DTYPE_PAIRS:
                for r_pad in (16, 256):
                    first = kernel_configs(variant, r_pad, x_dtype, adapter_dtype)[0]
                    yield variant, arch, x_dtype, adapter_dtype, first, r_pad
            yield variant, arch, torch.bfloat16, torch.bfloat16, kernel_configs(variant)[0], 16, True
        for r_pad in (16, 256):
            for config in kernel_configs(variant, r_pad)[r_pad == 16 :]:
                yield variant, 90, torch.bfloat16, torch.bfloat16, config, r_pad


def report_cases():
    """The full sweep for the compile report: every variant, architecture,
    dtype pair, rank bucket and (pruned) config."""
    for variant in VARIANTS:
        for arch in (80, 90):
            for x_dtype, adapter_dtype in DTYPE_PAIRS:
                for r_pad in (16, 64, 256):
                    for config in kernel_configs(variant, r_pad, x_dtype, adapter_dtype):
                        yield variant, arch, x_dtype, adapter_dtype, config, r_pad


def _compile_case(case):
    return compile_kernel(*case)


def compile_all(cases, workers=None):
    """Compile the cases in parallel processes; results in order."""
    with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        yield from pool.map(_compile_case, list(cases))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="store_true", help="only the cases the test suite compiles")
    args = parser.parse_args(argv)
    if INTERPRETED:
        raise SystemExit("unset TRITON_INTERPRET: an interpreted kernel cannot be compiled")
    for result in compile_all(suite_cases() if args.suite else report_cases()):
        print(json.dumps(dataclasses.asdict(result)), flush=True)


if __name__ == "__main__":
    main()
