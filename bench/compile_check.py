"""Compile every candidate's kernels for a GPU architecture without a GPU.

    python -m bench.compile_check [--suite] [--cache FILE]   # a JSON line per compile

How: each scenario (a candidate of `fused_lora/backends/candidates.py` on
prefill or decode rows, one adapter or many, with or without dropout, a
dtype pair, fp32 precision, rank and architecture) runs through the Triton
backend on CPU tensors with its kernel launches recorded instead of run.
Every recorded launch is then specialized by Triton's own binder, as
`JITFunction.run` specializes it on a GPU (unit strides and ints equal to 1
become constants, 16-byte aligned pointers and multiples of 16 get
`tt.divisibility`, stand-in tensors and None arguments as the launcher
passes them, TMA descriptors' boxes as the config's pre-hook sets them), and
compiled with `triton.compile` for a `GPUTarget`: the configs the pruning
keeps, or just the default one, or every config of the autotune space (see
report_configs and suite_configs). `ptxas -v`, as Triton runs it, reports
registers and spills (a ptxas run past --timeout is stopped and the row
says so); `metadata.shared` the shared memory, which the compiler does not
check against the device limit. Quantized base weights (NF4, FP8) and
DoRA's column scale run as scenarios of their own (one adapter).

Each config is marked as the launcher sees it: `pruned` when the kernel's
pruning (`fused_lora/kernels/configs.py`, through the kernel's own prune
wrapper) leaves it out for this launch on this architecture, `default` when
it is the first kept config (what a GPU runs unless FUSED_LORA_TUNE=1 times
the kept ones).

Must run with TRITON_INTERPRET unset (an interpreted kernel cannot be
compiled): the tests and the compile report run it in a process of their
own. It replaces, in this process only, what needs a GPU or would choose for
it: the kernels' `launch` and directly launched kernels (recorded),
`tuning.choose` (the scenario's candidate), `num_sms` (the architecture's SM
count: split-K, the dA / dB splits and the persistent grid depend on it) and
the architecture the pruning asks for.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import json
import multiprocessing
import os
import pathlib
import re
import shutil
import signal
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from fused_lora import batch, quantized
from fused_lora.backends import candidates, triton_backend, tuning
from fused_lora.kernels import configs, gemm, gemm_tma, quant, reduce, shrink
from fused_lora.kernels.common import INTERPRETED

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# (x / W dtype, adapter dtype) pairs the kernels accept on a GPU (checks.py).
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]
# The architectures and the SM counts of their data-centre GPUs (A100, H100).
ARCH_SMS = {80: 108, 90: 132}
RANKS = (16, 64, 256)
# Rows of a batch: a prefill / training batch and a decode step. Neither is
# a multiple of 16, as most token counts are not.
ROWS = {"prefill": 4095, "decode": 13}
FEATURES = 4096  # K = N


def precisions(x_dtype, adapter_dtype) -> tuple[str, ...]:
    """The fp32 precisions a launch can get: torch's default "ieee" and
    "tf32" where an operand is fp32; 16-bit operands have no choice."""
    return ("ieee", "tf32") if torch.float32 in (x_dtype, adapter_dtype) else ("ieee",)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One call of one candidate. `candidate`: "<pass>.<name>" of
    candidates.CANDIDATES ("reduce.kernel" for dA and dB, told apart by
    `grad`); `rows`: a key of ROWS; `g_only`: grad_x without dX (x needs no
    gradient); `deterministic`: torch.use_deterministic_algorithms(True)
    (the reduction's PIECES mode)."""

    candidate: str
    rows: str
    multi: bool
    dropout: bool
    x_dtype: torch.dtype
    adapter_dtype: torch.dtype
    precision: str
    r: int
    arch: int
    grad: str = ""
    g_only: bool = False
    deterministic: bool = False
    weight: str = "dense"  # or a quantized format: "nf4", "fp8"
    dora: bool = False  # DoRA's column scale, z kept for the magnitude's gradient

    @property
    def eligible(self) -> bool:
        """Whether candidates.eligible offers the candidate for this call
        (TMA: sm_90, one adapter of x's 16-bit dtype, dX without dropout)."""
        if self.dora and (self.candidate.endswith("splitk") or self.dropout):
            return False  # DoRA: no split-K; with dropout it is two plain GEMMs (functional.py)
        if not self.candidate.endswith("tma"):
            return True
        if self.weight != "dense" or self.dora:
            return False
        same_16_bit = self.x_dtype == self.adapter_dtype and self.x_dtype.itemsize == 2
        dx_dropout = self.candidate.startswith("grad_x") and self.dropout
        return self.arch >= 90 and same_16_bit and not self.multi and not dx_dropout

    @property
    def plain(self) -> bool:
        """One adapter without dropout on the candidate's main rows: the
        calls whose pruned configs the full report compiles too."""
        main_rows = "decode" if self.candidate.endswith("splitk") else "prefill"
        extras = self.multi or self.dropout or self.g_only or self.deterministic or self.dora or self.weight != "dense"
        return not extras and self.rows == main_rows

    @property
    def label(self) -> str:
        parts = [self.candidate, self.grad, "G only" if self.g_only else "", self.rows]
        parts += ["multi" if self.multi else "", "dropout" if self.dropout else ""]
        parts += ["deterministic" if self.deterministic else ""]
        parts += [self.weight if self.weight != "dense" else "", "DoRA" if self.dora else ""]
        return " ".join(p for p in parts if p)


@dataclasses.dataclass
class Launch:
    """A recorded kernel launch: the jit function, its arguments and
    constexpr flags; `tuned`: its triton.autotune wrapper (None for a kernel
    launched with a fixed tile: its flags hold the tile)."""

    kernel: object
    args: tuple
    flags: dict
    tuned: object = None

    def space(self) -> list:
        """The configs the launch may run: the autotune space, or its one tile."""
        if self.tuned is not None:
            return list(self.tuned.configs)
        tile = {k: v for k, v in self.flags.items() if k.startswith("BLOCK_")}
        options = {k: self.flags[k] for k in ("num_warps", "num_stages") if k in self.flags}
        return [triton.Config(tile, **options)]

    def kept(self) -> list:
        """The configs the pruning keeps, as the launcher asks for them."""
        if self.tuned is None:
            return self.space()
        return self.tuned.early_config_prune(self.tuned.configs, self.named_args(), **self.flags)

    def named_args(self) -> dict:
        return dict(zip(self.kernel.arg_names, self.args, strict=False))


class _Recorder:
    """Stands in for `launch.launch` and for kernels launched directly."""

    def __init__(self):
        self.launches: list[Launch] = []

    def launch(self, kernel, tuned, grid, args, flags, kind):
        self.launches.append(Launch(kernel, args, dict(flags), tuned))

    def direct(self, kernel, tuned=None):
        """kernel[grid](...) recorded; with `tuned` (the launcher ran the
        first kept config of its space itself), as a launch of that space."""
        recorder = self

        def run(*args, **flags):
            if tuned is not None:
                flags = {k: v for k, v in flags.items() if k not in tuned.configs[0].all_kwargs()}
            recorder.launches.append(Launch(kernel, args, flags, tuned))

        class Direct:
            def __getitem__(self, grid):
                return run

        return Direct()


@contextlib.contextmanager
def _recording(arch: int, candidate: str):
    """Launches recorded, `candidate` ("<pass>.<name>") run whatever
    tuning.choose would pick, the GPU-facing lookups answered for sm_<arch>."""
    recorder = _Recorder()
    name = candidate.split(".")[1]
    patches = [
        (gemm, "launch", recorder.launch),
        (shrink, "launch", recorder.launch),
        (reduce, "launch", recorder.launch),
        (gemm, "splitk_finish_kernel", recorder.direct(gemm.splitk_finish_kernel)),
        (reduce, "sum_pieces_kernel", recorder.direct(reduce.sum_pieces_kernel)),
        (
            gemm_tma,
            "lora_gemm_tma_kernel",
            recorder.direct(gemm_tma.lora_gemm_tma_kernel, gemm_tma.lora_gemm_tma_tuned),
        ),
        (tuning, "choose", lambda k, call, m, run: name),
        (candidates, "num_sms", lambda device: ARCH_SMS[arch]),
        (reduce, "num_sms", lambda device: ARCH_SMS[arch]),
        (gemm_tma, "num_sms", lambda device: ARCH_SMS[arch]),
        (configs, "_current_arch", lambda: arch),
        (torch.cuda, "get_device_capability", lambda device=None: divmod(arch, 10)),
    ]
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in patches]
    for module, attr, value in patches:
        setattr(module, attr, value)
    try:
        yield recorder
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _adapters(s: Scenario, count: int) -> batch.Adapters:
    # Many adapters: ranks r and r - 8 (H is r wide; every rank a multiple of 8).
    ranks = [s.r] if count == 1 else [s.r, s.r - 8] * (count // 2)
    lora_a = [torch.empty(r, FEATURES, dtype=s.adapter_dtype) for r in ranks]
    lora_b = [torch.empty(FEATURES, r, dtype=s.adapter_dtype) for r in ranks]
    return batch.Adapters(lora_a, lora_b, torch.full((count,), 2.0), [0.1 if s.dropout else 0.0] * count)


@functools.lru_cache(maxsize=8)
def _weight(weight_format: str, dtype: torch.dtype):
    """W (FEATURES x FEATURES): dense, or quantized as quantize_base stores it."""
    weight = torch.randn(FEATURES, FEATURES, generator=torch.Generator().manual_seed(0)).to(dtype)
    if weight_format == "dense":
        return weight
    return {"nf4": quantized.quantize_nf4, "fp8": quantized.quantize_fp8}[weight_format](weight)


def record(s: Scenario) -> list[Launch]:
    """The kernel launches of one scenario, in order."""
    m = ROWS[s.rows]
    adapters = _adapters(s, 4 if s.multi else 1)
    rows = None
    if s.multi:
        ids = torch.arange(m, dtype=torch.int32) % (adapters.count + 1) - 1  # every adapter, and base-only rows
        rows = batch.group_rows(ids, adapters.count, "cpu", sort=m > batch.UNSORTED_MAX_ROWS)
    x = torch.empty(m, FEATURES, dtype=s.x_dtype)
    weight = _weight(s.weight, s.x_dtype)
    dora = dict(column_scale=torch.empty(FEATURES), keep_z=True) if s.dora else {}
    skinny = torch.empty(m, s.r, dtype=s.adapter_dtype)
    old_precision = torch.backends.cuda.matmul.fp32_precision
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.backends.cuda.matmul.fp32_precision = s.precision
    torch.use_deterministic_algorithms(s.deterministic)
    try:
        with _recording(s.arch, s.candidate) as recorder:
            if s.candidate.startswith("forward"):
                triton_backend.forward(x, weight, torch.empty(FEATURES, dtype=s.x_dtype), adapters, rows, 1234, **dora)
            elif s.candidate.startswith("grad_x"):
                triton_backend.grad_x(x, weight, adapters, rows, 1234, compute_dx=not s.g_only)
            elif s.grad == "dA":
                triton_backend.grad_a(x, skinny, adapters, rows, 1234)
            else:
                triton_backend.grad_b(x, skinny, adapters, rows)
    finally:
        torch.backends.cuda.matmul.fp32_precision = old_precision
        torch.use_deterministic_algorithms(old_deterministic)
    return recorder.launches


def _calls() -> list[dict]:
    """Scenario fields apart from flags, dtypes, rank and arch: each
    candidate on the rows it runs on."""
    calls = []
    for kind in ("forward", "grad_x"):
        for name in ("fused", "prepass", "tma", "splitk"):
            for rows in ("prefill", "decode") if name != "splitk" else ("decode",):
                calls.append(dict(candidate=f"{kind}.{name}", rows=rows))
    calls += [dict(candidate="grad_x.fused", rows=rows, g_only=True) for rows in ROWS]
    for grad in ("dA", "dB"):
        calls.append(dict(candidate="reduce.kernel", grad=grad, rows="decode"))
        calls += [dict(candidate="reduce.kernel", grad=grad, rows="prefill", deterministic=d) for d in (False, True)]
    return calls


def _dtype_precisions() -> list[tuple]:
    return [(x, a, p) for x, a in DTYPE_PAIRS for p in precisions(x, a)]


def scenarios():
    """The full report's scenarios: every candidate's calls that compile
    differently (forward and grad_x on prefill and decode rows, split-K on
    decode only, grad_x without dX, dA and dB in each reduction mode: one
    chunk STORE, many ATOMIC, or PIECES when deterministic), with one
    adapter and many, with and without dropout (dB has none), for every
    dtype pair, fp32 precision, rank bucket and architecture."""
    for arch in ARCH_SMS:
        for x_dtype, adapter_dtype, precision in _dtype_precisions():
            for r in RANKS:
                for call in _calls():
                    for multi in (False, True):
                        for dropout in (False, True) if call.get("grad") != "dB" else (False,):
                            s = Scenario(
                                **call, multi=multi, dropout=dropout, x_dtype=x_dtype, adapter_dtype=adapter_dtype,
                                precision=precision, r=r, arch=arch,
                            )  # fmt: skip
                            if s.eligible and (s.plain or r != RANKS[1]):
                                yield s
        for x_dtype, adapter_dtype, precision in _dtype_precisions():
            for r in RANKS[::2]:
                yield from _extra_scenarios(x_dtype, adapter_dtype, precision, r, arch)


def _extra_scenarios(x_dtype, adapter_dtype, precision, r, arch):
    """Quantized W (16-bit x: the formats hold a 16-bit model's weights), in
    the forward and dX candidates with and without dropout, and DoRA's
    forward (column scale, z kept); one adapter."""
    common = dict(multi=False, x_dtype=x_dtype, adapter_dtype=adapter_dtype, precision=precision, r=r, arch=arch)
    for call in _calls():
        if call.get("grad") or call.get("g_only"):
            continue
        if x_dtype != torch.float32:
            for weight in ("nf4", "fp8"):
                for dropout in (False, True):
                    s = Scenario(**call, **common, dropout=dropout, weight=weight)
                    if s.eligible:
                        yield s
        if call["candidate"].startswith("forward"):
            s = Scenario(**call, **common, dropout=False, dora=True)
            if s.eligible:
                yield s


def suite_scenarios():
    """What the test suite compiles, about a hundred kernels: forward.fused
    and grad_x.fused in bf16 with one adapter on sm_90; on both
    architectures, the heaviest calls (forward.fused and grad_x.fused on
    prefill rows of many adapters with dropout) for every dtype pair and
    precision, and every other call, the dtype pair, precision and rank
    rotating; one adapter without dropout and many with, alternately."""
    dtype_precisions = _dtype_precisions()
    for candidate in ("forward.fused", "grad_x.fused"):  # every kept config: see suite_configs
        yield Scenario(candidate, "prefill", False, False, torch.bfloat16, torch.bfloat16, "ieee", 16, 90)
    for arch in ARCH_SMS:
        for i, (x_dtype, adapter_dtype, precision) in enumerate(dtype_precisions):
            for candidate in ("forward.fused", "grad_x.fused"):
                yield Scenario(candidate, "prefill", True, True, x_dtype, adapter_dtype, precision, RANKS[i % 3], arch)
        for i, call in enumerate(_calls()):
            x_dtype, adapter_dtype, precision = dtype_precisions[(i + arch) % len(dtype_precisions)]
            multi = i % 2 == 1
            dropout = multi and call.get("grad") != "dB"
            s = Scenario(
                **call, multi=multi, dropout=dropout, x_dtype=x_dtype, adapter_dtype=adapter_dtype,
                precision=precision, r=RANKS[(i + arch // 10) % 3], arch=arch,
            )  # fmt: skip
            if call["candidate"].endswith("tma"):  # one adapter of x's 16-bit dtype, on sm_90 only
                s = dataclasses.replace(
                    s,
                    multi=False,
                    dropout=False,
                    x_dtype=torch.bfloat16,
                    adapter_dtype=torch.bfloat16,
                    precision="ieee",
                )
            if s.eligible:
                yield s
        for i, (x_dtype, adapter_dtype, precision) in enumerate(dtype_precisions[1:]):  # 16-bit x
            r = RANKS[(i + arch // 10) % 3]
            extras = list(_extra_scenarios(x_dtype, adapter_dtype, precision, r, arch))
            yield from extras[(i + arch) % 9 :: 9]  # quantized W and DoRA: a rotating ninth


W_FORMATS = {
    int(quant.NF4): "NF4",
    int(quant.NF4_NESTED): "NF4_NESTED",
    int(quant.FP8): "FP8",
    int(quant.FP8_PER_TENSOR): "FP8_PER_TENSOR",
}


def _flags_label(flags: dict) -> str:
    """The launch's switches, short: the true booleans and the integers
    that select code (W_FORMAT when quantized, SPLIT_K > 1, MODE)."""
    names = [k for k, v in flags.items() if v is True and k != "UPCAST"]
    if flags.get("W_FORMAT", 0):
        names.append(W_FORMATS[int(flags["W_FORMAT"])])
    if flags.get("SPLIT_K", 1) > 1:
        names.append(f"SPLIT_K={flags['SPLIT_K']}")
    if "MODE" in flags:
        names.append({0: "STORE", 1: "ATOMIC", 2: "PIECES"}[int(flags["MODE"])])
    return " ".join(names)


def _precision_label(s: Scenario, flags: dict) -> str:
    """The fp32 precision the launch got: the LoRA dots' ("ieee", "tf32"),
    and the base GEMM's after it when that differs ("ieee, base tf32");
    the scenario's for a kernel without dots."""
    lora = flags.get("LORA_PRECISION", flags.get("PRECISION", s.precision))
    base = flags.get("BASE_PRECISION", lora) if s.x_dtype == torch.float32 else lora  # 16-bit x: no choice
    return lora if base == lora else f"{lora}, base {base}"


def report_configs(s: Scenario) -> str:
    """The full report's configs: every kept one of the plain calls (what
    FUSED_LORA_TUNE=1 may time), the default of the others (what a GPU runs
    unless it tunes): some five thousand compiles, about half an hour on two
    cores with an empty cache."""
    return "kept" if s.plain else "default"


def suite_configs(s: Scenario) -> str:
    """The suite's configs: every kept one of forward.fused and grad_x.fused
    with one adapter without dropout in bf16 on sm_90 (what
    FUSED_LORA_TUNE=1 times), else the default."""
    typical = s.plain and s.arch == 90 and s.x_dtype == s.adapter_dtype == torch.bfloat16
    return "kept" if typical and s.candidate in ("forward.fused", "grad_x.fused") else "default"


def _config_label(config) -> str:
    return " ".join(f"{k}={v}" for k, v in config.all_kwargs().items() if v is not None)


def _specialize(launch: Launch, config, arch: int):
    """(ASTSource, options, target) as JITFunction.run builds them for this
    launch and config on sm_<arch>."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    kwargs = {k: v for k, v in launch.flags.items() if k not in config.all_kwargs()}
    kwargs.update(config.all_kwargs())
    if config.pre_hook is not None:  # e.g. TMA descriptors' boxes follow the tile
        config.pre_hook({**launch.named_args(), **kwargs})
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(launch.kernel, signature, constexprs, attrs), options.__dict__, target


def plan(cases, which):
    """(rows without their results, each row's compile key, {key: job}) for
    the configs `which(scenario)` names of every launch of the scenarios:
    "default" (the first kept one), "kept", or "all" (the pruned ones too).
    A job, (scenario, launch index, config index), is compiled once however
    many scenarios share it."""
    rows, keys, jobs = [], [], {}
    for s in cases:
        for i, launch in enumerate(record(s)):
            space, kept = launch.space(), launch.kept()
            wanted = {"default": kept[:1], "kept": kept, "all": space}[which(s)]
            for j, config in enumerate(space):
                if config not in wanted:
                    continue
                source, options, _ = _specialize(launch, config, s.arch)
                key = f"{source.hash()} sm_{s.arch} {json.dumps(options, sort_keys=True, default=str)}"
                jobs.setdefault(key, (s, i, j))
                keys.append(key)
                rows.append(
                    dict(
                        kernel=launch.kernel.fn.__name__,
                        candidate=s.candidate,
                        scenario=s.label,
                        flags=_flags_label(launch.flags),
                        arch=s.arch,
                        dtype=DTYPE_NAMES[s.x_dtype],
                        adapter_dtype=DTYPE_NAMES[s.adapter_dtype],
                        precision=_precision_label(s, launch.flags),
                        r_pad=configs.pad_rank(s.r),
                        dropout=s.dropout,
                        config=_config_label(config),
                        pruned=config not in kept,
                        default=config is kept[0],
                        shared_limit=configs.SHARED_MEMORY_LIMIT[s.arch],
                        triton=triton.__version__,
                    )
                )
    return rows, keys, jobs


@functools.lru_cache(maxsize=8)
def _recorded(s: Scenario) -> list[Launch]:
    return record(s)


def _init_worker():
    # Triton's own ptxas run prints its -v log; a fresh compile every time
    # (a cached kernel would print none), in a cache nobody else reads.
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    triton.knobs.cache.dir = tempfile.mkdtemp(prefix="compile-check-")


def _alarm(signum, frame):
    raise TimeoutError


def compile_job(job, timeout: int = 0) -> dict:
    """Compile one (scenario, launch index, config index): shared bytes,
    registers per thread, spilled bytes (stores + loads), wgmma used. After
    `timeout` seconds (0: none) ptxas is stopped and the row says so: a
    config that spills hundreds of kilobytes can keep ptxas busy for minutes."""
    s, i, j = job
    launch = _recorded(s)[i]
    source, options, target = _specialize(launch, launch.space()[j], s.arch)
    log = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=target, options=options)
    except TimeoutError:
        return dict(shared=None, registers=None, spill_bytes=None, wgmma=None, timed_out=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        shutil.rmtree(triton.knobs.cache.dir, ignore_errors=True)
    text = log.getvalue()
    return dict(
        shared=compiled.metadata.shared,
        registers=int(re.findall(r"Used (\d+) registers", text)[-1]),
        spill_bytes=sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)),
        wgmma="wgmma" in compiled.asm["ptx"],
        timed_out=False,
    )


def compile_all(jobs: dict, workers: int, timeout: int):
    """Yield (key, result) for every job as it completes, compiled in
    `workers` processes. Spawned, not forked: a fork of a process that ran
    torch ops can deadlock in the child."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        futures = {pool.submit(compile_job, job, timeout): key for key, job in jobs.items()}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            yield futures[future], future.result()
            if done % 100 == 0 or done == len(futures):
                print(f"compiled {done} / {len(futures)}", file=sys.stderr, flush=True)


def _read_cache(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    entries = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {entry.pop("key"): entry for entry in entries}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="store_true", help="only the test suite's cases (kept configs)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="compiling processes")
    parser.add_argument("--timeout", type=int, default=30, help="seconds before ptxas is stopped (0: never)")
    parser.add_argument(
        "--cache", type=pathlib.Path, help="a JSON-lines file of earlier results (same kernel source, options, "
        "target), read and appended to: a rerun compiles only what changed"
    )  # fmt: skip
    args = parser.parse_args(argv)
    if INTERPRETED:
        raise SystemExit("unset TRITON_INTERPRET: an interpreted kernel cannot be compiled")
    cases = suite_scenarios() if args.suite else scenarios()
    rows, keys, jobs = plan(cases, suite_configs if args.suite else report_configs)
    rows_of = collections.defaultdict(list)
    for row, key in zip(rows, keys, strict=True):
        rows_of[key].append(row)
    cached = _read_cache(args.cache) if args.cache else {}
    # Kept configs first: the ones the claims are about (no spills) finish early.
    order = sorted(jobs, key=lambda key: all(row["pruned"] for row in rows_of[key]))
    todo = {key: jobs[key] for key in order if key not in cached}
    print(f"{len(rows)} rows, {len(jobs)} compiles, {len(jobs) - len(todo)} cached", file=sys.stderr, flush=True)
    for key in jobs.keys() - todo.keys():
        for row in rows_of[key]:
            print(json.dumps({**row, **cached[key]}), flush=True)
    if args.cache:
        args.cache.parent.mkdir(parents=True, exist_ok=True)
    with open(args.cache, "a") if args.cache else contextlib.nullcontext() as cache:
        for key, result in compile_all(todo, args.workers, args.timeout):
            for row in rows_of[key]:
                print(json.dumps({**row, **result}), flush=True)
            if cache and not result["timed_out"]:  # a timeout depends on the machine's load: tried again next time
                cache.write(json.dumps({"key": key, **result}) + "\n")
                cache.flush()


if __name__ == "__main__":
    main()
