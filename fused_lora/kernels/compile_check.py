"""Compile the kernels for a GPU architecture without a GPU.

`triton.compile` with a `GPUTarget` builds PTX and a cubin on any machine;
`ptxas -v` (shipped with Triton) reports registers and spills, and
`metadata.shared` the shared memory, which the compiler does not check
against the device limit. Must run with TRITON_INTERPRET unset (an
interpreted kernel cannot be compiled): tests and the compile report run it in
a process of its own.

    python -m fused_lora.kernels.compile_check [--suite]   # a JSON line per compile
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

from . import backward, configs, forward, multi_backward, multi_forward
from .common import INTERPRETED

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# (x / W dtype, adapter dtype) pairs the kernels accept on a GPU.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]
KERNELS = ("forward", "dx", "grad_ab", "multi_forward", "multi_dx", "multi_grad_ab")
DROPOUT_KERNELS = ("forward", "dx", "grad_ab")  # the multi-adapter kernels have no dropout


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


# The multi-adapter kernels' row order, adapter ids and adapter table.
MULTI_ROWS = dict(order_ptr="*i32", ids_ptr="*i32", table_ptr="*i64", scaling_ptr="*fp32")


def _signature(kernel, x_dtype, adapter_dtype):
    """(jit function, {arg: type}, tensor args' dtypes) for one kernel."""
    p, q = _pointer(x_dtype), _pointer(adapter_dtype)
    if kernel == "forward":
        fn = forward.lora_forward_kernel
        pointers = dict(x_ptr=p, w_ptr=p, bias_ptr=p, a_ptr=q, b_ptr=q, y_ptr=p, h_ptr=q)
        ints = ["M", "N", "K", "R", "M_BUCKET"]
    elif kernel == "dx":
        fn = backward.lora_dx_kernel
        pointers = dict(dy_ptr=p, w_ptr=p, a_ptr=q, b_ptr=q, dx_ptr=p, g_ptr=q)
        ints = ["M", "N", "K", "R", "M_BUCKET"]
    elif kernel == "multi_forward":  # rows in sorted order, adapters through a table
        fn = multi_forward.multi_lora_forward_kernel
        pointers = dict(x_ptr=p, w_ptr=p, bias_ptr=p, y_ptr=p, h_ptr=q, **MULTI_ROWS)
        ints = ["M", "N", "K", "R", "NUM_ADAPTERS", "M_BUCKET"]
    elif kernel == "multi_dx":
        fn = multi_backward.multi_lora_dx_kernel
        pointers = dict(dy_ptr=p, w_ptr=p, dx_ptr=p, g_ptr=q, **MULTI_ROWS)
        ints = ["M", "N", "K", "R", "NUM_ADAPTERS", "M_BUCKET"]
    elif kernel == "multi_grad_ab":
        fn = multi_backward.multi_lora_grad_ab_kernel
        pointers = dict(p_ptr=p, q_ptr=q, out_ptr="*fp32", order_ptr="*i32", work_ptr="*i32")
        pointers.update(table_ptr="*i64", scaling_ptr="*fp32")
        ints = ["P", "M_BUCKET"]
    else:  # dA^T from (x, G) and dB from (dY, H): one wide and one skinny operand
        fn = backward.lora_grad_ab_kernel
        pointers = dict(p_ptr=p, q_ptr=q, out_ptr="*fp32")
        ints = ["M", "P", "R", "M_PER_SPLIT"]
    signature = dict(pointers)
    for name in fn.arg_names:
        if name in UNIT_STRIDES:
            signature[name] = "constexpr"
        elif name in ints or name.startswith("stride_"):
            signature[name] = "i32"
        elif name in ("scaling", "dropout_p"):
            signature[name] = "fp32"
        elif name == "seed":
            signature[name] = "i32"
        elif name not in signature:
            signature[name] = "constexpr"
    return fn, signature


# What Triton's launcher specializes on at run time for contiguous inputs of
# ordinary sizes: unit strides become constants, pointers and the other
# strides and sizes are multiples of 16. Without this the compiler cannot
# vectorise loads nor pipeline them, and the report would describe a kernel
# that never runs.
UNIT_STRIDES = {
    "stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_yn", "stride_hr",
    "stride_dyn", "stride_dxk", "stride_gr", "stride_pp", "stride_qr", "stride_or",
}  # fmt: skip
NOT_MULTIPLE_OF_16 = {"M", "R", "scaling", "seed", "dropout_p"}


def _attrs(fn, signature):
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name] != "constexpr" and name not in NOT_MULTIPLE_OF_16
    }


def _precision(dtype):
    return "tf32" if dtype == torch.float32 else "ieee"


def _constexprs(kernel, x_dtype, adapter_dtype, r_pad, meta, dropout=False):
    flags = dict(UPCAST=False, ACC_DTYPE=tl.float32, R_PAD=r_pad, **meta)
    if kernel in DROPOUT_KERNELS:
        flags["DROPOUT"] = dropout
    if kernel == "forward":
        flags.update(
            HAS_BIAS=True, HAS_LORA=True, BASE_PRECISION=_precision(x_dtype), LORA_PRECISION=_precision(adapter_dtype)
        )
    elif kernel == "dx":
        flags.update(COMPUTE_DX=True, BASE_PRECISION=_precision(x_dtype), LORA_PRECISION=_precision(adapter_dtype))
    elif kernel == "multi_forward":  # ranks multiples of 8, as LoRA ranks usually are
        flags.update(HAS_BIAS=True, SORTED=True, RANK_MULTIPLE=8, BASE_PRECISION=_precision(x_dtype))
        flags.update(LORA_PRECISION=_precision(adapter_dtype))
    elif kernel == "multi_dx":
        flags.update(COMPUTE_DX=True, SORTED=True, RANK_MULTIPLE=8, BASE_PRECISION=_precision(x_dtype))
        flags.update(LORA_PRECISION=_precision(adapter_dtype))
    elif kernel == "multi_grad_ab":
        flags.update(SCALED=True, PRECISION=_precision(adapter_dtype))
    else:
        flags.update(ATOMIC=True, PRECISION=_precision(adapter_dtype))
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


def compile_kernel(kernel, arch, x_dtype, adapter_dtype, config, r_pad=16, dropout=False) -> CompileResult:
    """Compile one kernel for sm_<arch> with one autotune config (and the
    dropout path when `dropout`)."""
    fn, signature = _signature(kernel, x_dtype, adapter_dtype)
    constexprs = _constexprs(kernel, x_dtype, adapter_dtype, r_pad, config.kwargs, dropout)
    constexprs.update({name: 1 for name in UNIT_STRIDES if name in fn.arg_names})
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=_attrs(fn, signature))
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    registers, spills = _ptxas_report(compiled.asm["ptx"], arch)
    return CompileResult(
        kernel=kernel,
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


def kernel_configs(kernel, r_pad=16, dtype=torch.bfloat16, adapter_dtype=None):
    """The autotune configs the kernel would try at this rank (after pruning)."""
    wide = torch.empty(0, dtype=dtype, device="meta")
    adapter = torch.empty(0, dtype=adapter_dtype or dtype, device="meta")
    if kernel in ("forward", "dx"):
        args = {"M": 4096, "x_ptr": wide, "a_ptr": adapter}
        return configs.prune_gemm_configs(configs.GEMM_CONFIGS, args, R_PAD=r_pad)
    if kernel in ("multi_forward", "multi_dx"):
        args = {"M": 4096, "x_ptr": wide, "h_ptr": adapter}
        return multi_forward.prune_configs(multi_forward.MULTI_GEMM_CONFIGS, args, R_PAD=r_pad)
    return configs.prune_grad_ab_configs(configs.GRAD_AB_CONFIGS, {"p_ptr": wide, "q_ptr": adapter}, R_PAD=r_pad)


def suite_cases():
    """What the test suite compiles: every kernel x dtype pair x {sm_80,
    sm_90} with the first config (and bf16 with dropout), and every config
    for bf16 on sm_90, at r = 16 and r = 256."""
    for kernel in KERNELS:
        for arch in (80, 90):
            for x_dtype, adapter_dtype in DTYPE_PAIRS:
                yield kernel, arch, x_dtype, adapter_dtype, kernel_configs(kernel, 16, x_dtype, adapter_dtype)[0], 16
            if kernel in DROPOUT_KERNELS:
                yield kernel, arch, torch.bfloat16, torch.bfloat16, kernel_configs(kernel)[0], 16, True
        for r_pad in (16, 256):
            for config in kernel_configs(kernel, r_pad)[r_pad == 16 :]:
                yield kernel, 90, torch.bfloat16, torch.bfloat16, config, r_pad


def report_cases():
    """The full sweep for the compile report: every kernel, architecture,
    dtype pair, rank bucket and (pruned) config."""
    for kernel in KERNELS:
        for arch in (80, 90):
            for x_dtype, adapter_dtype in DTYPE_PAIRS:
                for r_pad in (16, 64, 256):
                    for config in kernel_configs(kernel, r_pad, x_dtype, adapter_dtype):
                        yield kernel, arch, x_dtype, adapter_dtype, config, r_pad


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
