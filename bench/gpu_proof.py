"""python -m bench.gpu_proof: what a short GPU lease must prove, in one command.

    PYTHONPATH=. python -m bench.gpu_proof --out bench/results   # a GPU: sized for 5 minutes, cold Triton cache
    python -m bench.gpu_proof --dry-run --out /tmp/proof          # a CPU: the same steps, interpreted, tiny shapes

Four steps, in this order, each recorded in <out>/gpu-proof-<device>.json,
which is rewritten after every step and every case, so that a run cut off
still leaves what it measured:

  correctness    every primitive x candidate (forced with tuning.use) x dtype
                 pair, one adapter and several, with and without dropout, at
                 odd shapes, against float64; fp32 also under TF32
  headline       bench.runner.run_case on the headline rows (merged, naive,
                 composed, fused, triton-base, floor; peak memory), then the
                 fused layer with each of its candidates forced, timed
  multi_adapter  bench.multi_adapter.time_case for 1, 16 and 64 adapters
  choices        per primitive call of those shapes: what tuning.choose picks,
                 and which candidate is fastest (timed like FUSED_LORA_TUNE);
                 written as a table in tuning's format, <out>/tuned/<device>.json

A cold Triton cache makes compiling most of a proof's time, so the
correctness rows, and one run of every kernel the later steps time, run first
in --jobs worker processes that fill the on-disk cache in parallel; the
timing steps then run alone. --budget-s bounds the whole run: a step that
cannot start in time is recorded as skipped, and each step stops taking new
cases once its share of the budget is spent.

--dry-run runs the same code on the CPU: it switches on the Triton
interpreter itself (before triton is imported), uses tiny shapes, and its
timings mean nothing (the JSON says so).
"""

import os
import sys

if __name__ == "__main__":
    # Triton decides whether kernels are interpreted when they are decorated,
    # i.e. when fused_lora is imported: the variable must be set before any
    # import below. Workers (spawned processes) inherit it. The proof measures
    # the defaults, so the switches that would change them are dropped.
    if "--dry-run" in sys.argv[1:]:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences Triton 3.9's warning; older Tritons ignore it
    SWITCHES = ("FUSED_LORA_TUNE", "FUSED_LORA_CANDIDATES", "FUSED_LORA_BACKEND")
    IGNORED = {name: os.environ.pop(name) for name in SWITCHES if name in os.environ}

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import pathlib
import statistics
import time
import traceback

import torch
import torch.nn.functional as F
import triton

import fused_lora
from fused_lora.backends import tuning
from fused_lora.backends.candidates import eligible
from fused_lora.kernels.common import INTERPRETED
from fused_lora.reference import merged_weight, within_tolerance

from . import implementations as impl
from . import multi_adapter
from .cases import DTYPES, Case, meets
from .report import device_slug, environment, summarize
from .runner import PASSES, check, make_inputs, peak_bytes, reference, run_case, time_triton_base
from .timing import Timing, measure, measure_all, rotations

RESULTS = pathlib.Path(__file__).parent / "results"
STEPS = ("correctness", "headline", "multi_adapter", "choices")
# Each step's share of the budget left when it starts (split over the steps
# still to run), and the least time worth starting it with.
SHARES = {"correctness": 0.4, "headline": 0.3, "multi_adapter": 0.1, "choices": 0.2}
MIN_SECONDS = {"correctness": 20, "headline": 20, "multi_adapter": 10, "choices": 10}
PAIRS = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp32")]
SEED = 1234  # the dropout seed of every call (bench.implementations.Params uses the same)
DROPOUT = 0.1
SKIPPED = {"status": "skipped", "reason": "the step's budget was spent"}
DRY_RUN_NOTE = (
    "dry run: the Triton kernels run in the interpreter on the CPU at tiny shapes; every timing in this file "
    "is wall clock of interpreted code and means nothing about the kernels"
)


# ---- what runs: the plan per mode --------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """One layer call: x (m, k), W (n, k), bias (n,) or none, one adapter
    (ranks of one, lora_linear) or several (multi_lora_linear; each row on
    one adapter or none); adapters of adapter_dtype; dropout p for the first
    adapter (several: p, 2p, 0, ... cycling)."""

    m: int
    k: int
    n: int
    ranks: tuple[int, ...]
    dtype: str = "bf16"
    adapter_dtype: str = "bf16"
    multi: bool = False
    dropout: float = 0.0
    bias: bool = True

    @property
    def dropout_ps(self) -> list[float]:
        return [(self.dropout, 2 * self.dropout, 0.0)[a % 3] for a in range(len(self.ranks))]

    @property
    def label(self) -> str:
        ranks = "/".join(map(str, sorted(set(self.ranks))))
        adapters = f"{len(self.ranks)} adapters r{ranks}" if self.multi else f"r{ranks}"
        dtypes = self.dtype if self.adapter_dtype == self.dtype else f"{self.dtype}/{self.adapter_dtype}"
        extra = (f" p{self.dropout:g}" if self.dropout else "") + ("" if self.bias else " no bias")
        return f"{self.m}x{self.k}x{self.n} {adapters} {dtypes}{extra}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shapes of every step: (M, K, N, rank of the single adapter) for
    correctness (the several-adapter rows use many_ranks), the headline cases
    (with whether their adapters are fp32), the multi-adapter batches and
    adapter counts, and whether the table's shapes have a bias."""

    correctness_shapes: tuple
    many_ranks: tuple
    headline: tuple
    batches: tuple
    adapter_counts: tuple
    choice_biases: tuple = (False, True)

    def choice_problems(self) -> list[Problem]:
        """The shapes whose choices go into the table: the headline cases and
        the multi-adapter batches, without a bias (real models' projections)
        first, then with one (the benchmark's)."""
        problems = []
        for bias in self.choice_biases:
            for case, fp32_adapters in self.headline:
                adapter_dtype = "fp32" if fp32_adapters else case.dtype
                shape = (case.m, case.k, case.n, (case.r,))
                problems.append(Problem(*shape, case.dtype, adapter_dtype, False, case.dropout, bias))
            for batch in self.batches:
                dtype = _dtype_name(batch.dtype)
                for count in self.adapter_counts:
                    problems.append(
                        Problem(batch.m, batch.k, batch.n, (batch.r,) * count, dtype, dtype, True, 0.0, bias)
                    )
        return problems


def plan(dry_run: bool) -> Plan:
    """The GPU's rows; for a dry run, tiny sizes and one row of each kind
    (the interpreter runs a kernel's programs one by one in Python): the
    same code runs, in a minute on two cores."""
    if dry_run:
        headline = (
            (Case(64, 32, 32, 16, "bf16", "prefill"), False),
            (Case(1, 32, 32, 16, "bf16", "decode"), False),
            (Case(64, 32, 32, 16, "bf16", "fp32 adapters on bf16"), True),
            (Case(64, 32, 32, 16, "bf16", "training with dropout", dropout=DROPOUT), False),
        )
        batches = (
            multi_adapter.Batch(16, 1, 32, 32, 16, torch.bfloat16, "decode"),
            multi_adapter.Batch(64, 1, 32, 32, 16, torch.bfloat16, "prefill", backward=True),
        )
        return Plan(((7, 37, 29, 5), (33, 40, 24, 16)), (16, 5, 9), headline, batches, (1, 4), (False,))
    headline = (
        (Case(4096, 4096, 4096, 16, "bf16", "prefill / training, attention projection"), False),
        (Case(4096, 4096, 4096, 64, "bf16", "prefill / training, attention projection"), False),
        (Case(8192, 4096, 14336, 16, "bf16", "training, MLP up-projection"), False),
        (Case(1, 4096, 4096, 16, "bf16", "decode, attention projection"), False),
        (Case(16, 4096, 4096, 16, "bf16", "decode batch, attention projection"), False),
        (Case(4096, 4096, 4096, 16, "bf16", "fp32 adapters on bf16"), True),
        (Case(4096, 4096, 4096, 16, "bf16", "training with dropout", dropout=DROPOUT), False),
    )
    batches = (  # as bench.multi_adapter's; its prefill batch has a request for each of 64 adapters
        multi_adapter.Batch(16, 1, 4096, 4096, 16, torch.bfloat16, "decode"),
        multi_adapter.Batch(64, 64, 4096, 4096, 16, torch.bfloat16, "prefill", backward=True),
    )
    # Most telling first (a run cut short keeps those): M = 7 splits K
    # (decode), 130 does not; K and N odd, but for the third shape, whose
    # are multiples of 8 as TMA needs (16-byte rows); then M = 1 and 33.
    shapes = ((7, 97, 129, 16), (130, 97, 129, 5), (130, 136, 200, 16), (1, 129, 97, 5), (33, 129, 97, 16))
    return Plan(shapes, (16, 5, 9), headline, batches, (1, 16, 64))


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


# ---- running a layer and watching tuning.choose ------------------------------


@dataclasses.dataclass
class Choice:
    """One tuning.choose of the backend: the primitive (kind), its table
    key, the eligible candidates, the one chosen, and how to run any of them
    on the same call (run(name))."""

    kind: str
    key: str
    m: int
    eligible: list
    chosen: str
    call: object
    run: object


@contextlib.contextmanager
def recording():
    """Every tuning.choose the backend makes in this block, as Choices. The
    backend looks `tuning.choose` up at each call, and tuning has no hook to
    observe its choices, so the function is wrapped for the block."""
    log = []
    choose = tuning.choose

    def recorded(kind, call, m, run):
        name = choose(kind, call, m, run)
        log.append(Choice(kind, tuning.key(kind, call, m), m, eligible(kind, call, m), name, call, run))
        return name

    tuning.choose = recorded
    try:
        yield log
    finally:
        tuning.choose = choose


def ran(log) -> dict:
    """{primitive: [candidate of each of its calls]}."""
    out = {}
    for choice in log:
        out.setdefault(choice.kind, []).append(choice.chosen)
    return out


def forced_sets(log) -> list[dict]:
    """Forcings that, together, run every eligible candidate of every
    primitive at least once: the i-th eligible candidate of each primitive
    together (the lists come from a default run's log)."""
    lists = {}
    for choice in log:
        lists.setdefault(choice.kind, choice.eligible)
    count = max(map(len, lists.values()), default=0)
    return [{kind: names[i % len(names)] for kind, names in lists.items()} for i in range(count)]


def not_forced(forced: dict, log) -> list[str]:
    """The calls whose candidate is not the forced one (tuning.use forces
    only where the candidate is eligible)."""
    return [
        f"{c.kind}: forced {forced[c.kind]}, ran {c.chosen}" for c in log if forced.get(c.kind, c.chosen) != c.chosen
    ]


@dataclasses.dataclass
class Tensors:
    """A Problem's inputs: x (m, k), weight, bias, lora_a / lora_b (lists),
    scalings (floats), ids (m,) on the CPU (-1: no adapter; one adapter:
    all 0), grad_y (m, n)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: list
    lora_b: list
    scalings: list
    ids: torch.Tensor
    grad_y: torch.Tensor


def make_tensors(problem: Problem, device, seed: int = 0) -> Tensors:
    """Fresh random inputs scaled like a trained layer (unit-variance outputs;
    B random, never a fresh adapter's zeros); each row on adapter i % (n + 1)
    (n: none) in a shuffled order."""
    torch.manual_seed(seed)
    dtype, adapter_dtype = DTYPES[problem.dtype], DTYPES[problem.adapter_dtype]

    def randn(*shape, scale=1.0, as_dtype=dtype):
        return (torch.randn(*shape, device=device) * scale).to(as_dtype)

    count = len(problem.ranks)
    if problem.multi:
        ids = torch.arange(problem.m) % (count + 1)
        ids = torch.where(ids == count, -1, ids)[torch.randperm(problem.m)]
    else:
        ids = torch.zeros(problem.m, dtype=torch.int64)
    return Tensors(
        x=randn(problem.m, problem.k).requires_grad_(),
        weight=randn(problem.n, problem.k, scale=problem.k**-0.5),
        bias=randn(problem.n) if problem.bias else None,
        lora_a=[
            randn(r, problem.k, scale=problem.k**-0.5, as_dtype=adapter_dtype).requires_grad_() for r in problem.ranks
        ],
        lora_b=[randn(problem.n, r, scale=r**-0.5, as_dtype=adapter_dtype).requires_grad_() for r in problem.ranks],
        scalings=[0.5 + 0.75 * (a % 3) for a in range(count)],
        ids=ids,
        grad_y=randn(problem.m, problem.n),
    )


def run_layer(problem: Problem, t: Tensors, backward: bool = True):
    """y, and (backward) the gradients of x, every A, every B (None for an
    adapter without rows)."""
    if problem.multi:
        y = fused_lora.multi_lora_linear(t.x, t.weight, t.bias, t.lora_a, t.lora_b, t.scalings, t.ids,
                                         dropout_p=problem.dropout_ps, seed=SEED)  # fmt: skip
    else:
        y = fused_lora.lora_linear(t.x, t.weight, t.bias, t.lora_a[0], t.lora_b[0], t.scalings[0],
                                   dropout_p=problem.dropout, seed=SEED)  # fmt: skip
    if not backward:
        return y, []
    return y, list(torch.autograd.grad(y, [t.x, *t.lora_a, *t.lora_b], t.grad_y, allow_unused=True))


def layer_reference(problem: Problem, t: Tensors, device):
    """float64 y and gradients of x, every A, every B on the CPU, each row's
    LoRA input masked as the backend masks it (fused_lora.dropout_mask)."""

    def f64(v):
        return None if v is None else v.detach().to("cpu", torch.float64)

    x = f64(t.x).requires_grad_()
    lora_a = [f64(a).requires_grad_() for a in t.lora_a]
    lora_b = [f64(b).requires_grad_() for b in t.lora_b]
    y = F.linear(x, f64(t.weight), f64(t.bias))
    for a, p in enumerate(problem.dropout_ps):
        d = x
        if p > 0:
            d = x * fused_lora.dropout_mask(tuple(x.shape), p, SEED, device).cpu().double() / (1 - p)
        rows = (t.ids == a).double().unsqueeze(1)
        y = y + rows * (t.scalings[a] * F.linear(F.linear(d, lora_a[a]), lora_b[a]))
    return y, torch.autograd.grad(y, [x, *lora_a, *lora_b], f64(t.grad_y))


@contextlib.contextmanager
def fp32_precision(precision: str):
    """torch's fp32 matmul precision ("ieee" or "tf32"), which the kernels follow, for a block."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = before


# ---- step 1: correctness (in the workers) ------------------------------------


@dataclasses.dataclass(frozen=True)
class Group:
    """The correctness rows of one dtype pair, precision, shape and adapter
    count, with and without dropout."""

    pair: tuple
    precision: str
    shape: tuple
    many_ranks: tuple
    multi: bool
    device: str
    deadline: float

    @property
    def label(self) -> str:
        m, k, n, _ = self.shape
        tf32 = " tf32" if self.precision == "tf32" else ""
        return f"{'/'.join(self.pair)}{tf32} {m}x{k}x{n} {'many' if self.multi else 'one'}"


def correctness_groups(the_plan: Plan, device: str, deadline: float) -> list[Group]:
    """Shape by shape (the plan's order), every dtype pair: bf16 first, TF32
    last."""
    order = [PAIRS[2], PAIRS[3], PAIRS[1], PAIRS[4], PAIRS[0]]
    settings = [(pair, "ieee") for pair in order] + [(PAIRS[0], "tf32")]
    return [
        Group(pair, precision, shape, the_plan.many_ranks, multi, device, deadline)
        for shape in the_plan.correctness_shapes
        for pair, precision in settings
        for multi in (False, True)
    ]


def _tolerance_key(dtype: torch.dtype, precision: str):
    return "tf32" if precision == "tf32" and dtype == torch.float32 else dtype


def check_row(problem: Problem, t: Tensors, ref, forced: dict, precision: str) -> tuple[dict, list]:
    """One forward + backward with `forced` candidates against the float64
    reference: y, dX, each dA and dB within fused_lora.reference's tolerance
    for its dtype (the "tf32" row under TF32), and each forced candidate
    really ran. Returns (row, the log of choices)."""
    with tuning.use(**forced), recording() as log:
        y, grads = run_layer(problem, t)
    ref_y, ref_grads = ref
    count = len(problem.ranks)
    names = ["dx", *(f"dA[{a}]" for a in range(count)), *(f"dB[{a}]" for a in range(count))]
    dtype, adapter_dtype = DTYPES[problem.dtype], DTYPES[problem.adapter_dtype]
    checks = {"y": within_tolerance(y, ref_y, _tolerance_key(dtype, precision))}
    for i, (name, grad, ref_grad) in enumerate(zip(names, grads, ref_grads, strict=True)):
        grad = torch.zeros_like(ref_grad) if grad is None else grad  # an adapter without rows
        key = _tolerance_key(dtype if i == 0 else adapter_dtype, precision)
        checks[name] = within_tolerance(grad, ref_grad, key, "gradients")
    missed = not_forced(forced, log)
    row = {
        "forced": forced,
        "ran": ran(log),
        "checks": {
            name: {"ok": ok, "worst_error_over_allowed": round(worst, 4)} for name, (ok, worst) in checks.items()
        },
        "ok": all(ok for ok, _ in checks.values()) and not missed,
    }
    if missed:
        row["not_forced"] = missed
    return row, log


def run_group(group: Group) -> list[dict]:
    """Every row of a group: per dropout setting, the default choices, then
    forcings that run every eligible candidate (forced_sets of the default's
    log), except one equal to the default."""
    rows = []
    m, k, n, rank = group.shape
    dtype, adapter_dtype = group.pair
    device = torch.device(group.device)
    for dropout in (0.0, DROPOUT):
        ranks = group.many_ranks if group.multi else (rank,)
        problem = Problem(m, k, n, ranks, dtype, adapter_dtype, group.multi, dropout)
        base = {
            "dtype": dtype,
            "adapter_dtype": adapter_dtype,
            "precision": group.precision,
            "m": m,
            "k": k,
            "n": n,
            "ranks": list(ranks),
            "adapters": "many" if group.multi else "one",
            "dropout": problem.dropout_ps,
        }
        pending = [{}]  # the default first: its log says what is eligible
        while pending:
            forced = pending.pop(0)
            if time.time() > group.deadline:
                rows.append({**base, "forced": forced, **SKIPPED})
                continue
            try:
                with fp32_precision(group.precision):
                    t = make_tensors(problem, device, seed=len(rows))
                    row, log = check_row(problem, t, layer_reference(problem, t, device), forced, group.precision)
            except Exception:
                rows.append(
                    {**base, "forced": forced, "status": "failed", "ok": False, "error": traceback.format_exc()}
                )
                continue
            rows.append({**base, **row, "status": "done"})
            if not forced:
                pending = [f for f in forced_sets(log) if any(f[c.kind] != c.chosen for c in log)]
    return rows


def coverage(rows: list[dict]) -> dict:
    """{"<primitive>/<candidate> <dtype pair>[ tf32]": {"rows": n, "ok": n}}
    over the rows that ran."""
    out = {}
    for row in rows:
        if row.get("status") != "done":
            continue
        pair = f"{row['dtype']}/{row['adapter_dtype']}" + (" tf32" if row["precision"] == "tf32" else "")
        for kind, names in row["ran"].items():
            for name in set(names):
                entry = out.setdefault(f"{kind}/{name} {pair}", {"rows": 0, "ok": 0})
                entry["rows"] += 1
                entry["ok"] += bool(row["ok"])
    return dict(sorted(out.items()))


# ---- compiling ahead: one run of every kernel the timing steps use -----------


@dataclasses.dataclass(frozen=True)
class Warm:
    """Run once (in a worker, to fill the Triton cache) every kernel a later
    step runs for a headline case (bench's inputs) or a Problem."""

    device: str
    deadline: float
    case: Case | None = None
    fp32_adapters: bool = False
    problem: Problem | None = None

    @property
    def label(self) -> str:
        return (
            self.problem.label if self.problem else self.case.label + (" fp32 adapters" if self.fp32_adapters else "")
        )


def warm(task: Warm) -> dict:
    """The default run, each forcing of forced_sets, and the forward without
    autograd (and triton-base for a case), each once."""
    if time.time() > task.deadline:
        return {"label": task.label, **SKIPPED}
    device = torch.device(task.device)
    started = time.time()
    try:
        if task.case is not None:
            p, (x,), grad_y = make_params(task.case, task.fp32_adapters, device, 1)

            def step(backward):
                if backward:
                    return impl.forward_backward("fused", x, p, grad_y)
                with torch.no_grad():
                    return impl.fused(x, p)

            if device.type == "cuda":
                with torch.no_grad():
                    impl.triton_base(x, p)
        else:
            t = make_tensors(task.problem, device)

            def step(backward):
                with contextlib.nullcontext() if backward else torch.no_grad():
                    return run_layer(task.problem, t, backward)

        with recording() as log:
            step(True)
        step(False)
        for forced in forced_sets(log):
            with tuning.use(**forced):
                step(True)
                step(False)
    except Exception:
        return {"label": task.label, "status": "failed", "error": traceback.format_exc()}
    return {"label": task.label, "status": "done", "seconds": round(time.time() - started, 2)}


def warm_tasks(the_plan: Plan, steps, device: str, deadline: float) -> list[Warm]:
    tasks = []
    if {"headline", "choices", "multi_adapter"} & set(steps):
        tasks += [Warm(device, deadline, case=case, fp32_adapters=fp32) for case, fp32 in the_plan.headline]
    if {"choices", "multi_adapter"} & set(steps):
        # With a bias, a headline problem is the case above: run only the others.
        headline = {(c.m, c.k, c.n, c.r, c.dropout) for c, _ in the_plan.headline}
        tasks += [
            Warm(device, deadline, problem=p)
            for p in the_plan.choice_problems()
            if p.multi or not p.bias or (p.m, p.k, p.n, p.ranks[0], p.dropout) not in headline
        ]
    return tasks


# ---- the worker processes ----------------------------------------------------


def _init_worker():
    torch.set_num_threads(1)  # the workers share the cores


def _indexed(job):
    index, fn, task = job
    return index, fn(task)


class _Inline:
    """An iterator with the pool's next(timeout) (the timeout is moot here)."""

    def __init__(self, iterator):
        self.iterator = iterator

    def next(self, timeout=None):
        return next(self.iterator)


class Workers:
    """Runs (fn, task) jobs in `jobs` spawned processes (CUDA cannot fork),
    or in this process when jobs == 1. Results come back as they finish."""

    def __init__(self, jobs: int):
        self.pool = multiprocessing.get_context("spawn").Pool(jobs, _init_worker) if jobs > 1 else None

    def run(self, fn, tasks):
        """An iterator over (index, result), lazily in this process."""
        jobs = [(i, fn, task) for i, task in enumerate(tasks)]
        if self.pool is None:
            return _Inline(map(_indexed, jobs))
        return self.pool.imap_unordered(_indexed, jobs)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()  # a worker still compiling must not run beside the timing steps
            self.pool.join()


def collect(results, count: int, deadline: float):
    """Yield (index, result) of the jobs as they finish, until all `count`
    have or the deadline (plus a grace period for the rows running then)
    passes: a worker that died or hangs leaves its jobs unfinished."""
    for _ in range(count):
        try:
            yield results.next(timeout=max(1.0, deadline + 30 - time.time()))
        except (multiprocessing.TimeoutError, StopIteration):
            return


# ---- step 2: the headline rows -----------------------------------------------


def make_params(case: Case, fp32_adapters: bool, device, n_sets: int):
    """bench's inputs for a case (bench.runner.make_inputs), with the
    adapters in fp32 when asked (PEFT's default on a bf16 model)."""
    p, xs, grad_y = make_inputs(case, device, n_sets)
    if fp32_adapters:
        p.lora_a = p.lora_a.detach().float().requires_grad_()
        p.lora_b = p.lora_b.detach().float().requires_grad_()
        p.merged_weight = merged_weight(p.weight, p.lora_a.detach(), p.lora_b.detach(), p.scaling)
    return p, xs, grad_y


def compact(entry: dict) -> dict:
    """A timing entry without its every sample (a GPU run takes thousands):
    their count, minimum and 20th / 80th percentiles instead."""
    entry = dict(entry)
    samples = entry.pop("samples_ms", None)
    if samples:
        q = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else [samples[0]] * 4
        entry.update(samples=len(samples), min_ms=min(samples), p20_ms=q[0], p80_ms=q[3])
    return entry


def measure_or_once(make_call, device, n_sets: int, quick: bool) -> Timing:
    """bench.timing.measure; under the interpreter (a dry run) one call:
    its time means nothing, and the dry run must fit in a minute."""
    if not INTERPRETED:
        return measure(make_call, device, n_sets, quick)
    started = time.perf_counter()
    make_call(0)()
    elapsed_ms = (time.perf_counter() - started) * 1e3
    return Timing(elapsed_ms, [elapsed_ms])


def _timing(timing) -> dict:
    return compact({"median_ms": timing.median_ms, "spread": timing.spread, "samples_ms": timing.samples_ms})


def run_fp32_adapter_case(case: Case, device, quick: bool) -> dict:
    """bench.runner.run_case for fp32 adapters on a 16-bit layer, which
    bench's cases cannot express: the same checks, memory and timings, but
    without `composed` (Unsloth's path needs adapters in x's dtype)."""
    dtype = DTYPES[case.dtype]
    n_sets = rotations(case.m * case.k * dtype.itemsize, device)
    p, xs, grad_y = make_params(case, True, device, n_sets)
    ref = reference(xs[0], p, grad_y)
    result = {pass_: {} for pass_ in PASSES}
    names = [name for name in impl.IMPLEMENTATIONS if name != "composed"]
    for name in names:
        checked = check(name, xs[0], p, grad_y, ref, dtype)
        for pass_ in PASSES:
            ok, worst = checked[pass_]
            result[pass_][name] = {"check_ok": ok, "worst_error_over_allowed": worst}
        result["forward+backward"][name]["peak_bytes"] = peak_bytes(name, xs[0], p, grad_y)
    for pass_ in PASSES:
        passed = {name: _maker(name, pass_, xs, p, grad_y) for name in names if result[pass_][name]["check_ok"]}
        for name, timing in measure_all(passed, device, n_sets, quick).items():
            result[pass_][name].update(median_ms=timing.median_ms, spread=timing.spread, samples_ms=timing.samples_ms)
    if device.type == "cuda":
        result["forward"]["triton-base"] = time_triton_base(xs, p, dtype, device, n_sets, quick)
    return result


def _maker(name, pass_, xs, p, grad_y):
    """make_call(i) for bench.timing.measure: the forward as inference runs
    it, or forward + backward."""

    def forward(x):
        with torch.no_grad():
            impl.IMPLEMENTATIONS[name](x, p)

    if pass_ == "forward":
        return lambda i: lambda: forward(xs[i])
    return lambda i: lambda: impl.forward_backward(name, xs[i], p, grad_y)


def time_candidates(case: Case, fp32_adapters: bool, device, quick: bool, merged_ms: dict) -> list[dict]:
    """The fused layer with each forcing of forced_sets: its check, the
    candidates that ran, its peak memory and its times (forward, forward +
    backward) next to merged's."""
    dtype = DTYPES[case.dtype]
    n_sets = rotations(case.m * case.k * dtype.itemsize, device)
    p, xs, grad_y = make_params(case, fp32_adapters, device, n_sets)
    ref = reference(xs[0], p, grad_y)
    with recording() as log:
        impl.forward_backward("fused", xs[0], p, grad_y)
    rows = []
    for forced in forced_sets(log):
        with tuning.use(**forced), recording() as forced_log:
            checked = check("fused", xs[0], p, grad_y, ref, dtype)
        missed = not_forced(forced, forced_log)
        ok = checked["forward+backward"][0] and not missed
        row = {"forced": forced, "ran": ran(forced_log), "check_ok": ok,
               "worst_error_over_allowed": checked["forward+backward"][1]}  # fmt: skip
        if missed:
            row["not_forced"] = missed
        if ok:
            with tuning.use(**forced):
                row["peak_bytes"] = peak_bytes("fused", xs[0], p, grad_y)
                for pass_ in PASSES:
                    entry = _timing(measure_or_once(_maker("fused", pass_, xs, p, grad_y), device, n_sets, quick))
                    if merged_ms.get(pass_):
                        entry["fused/merged"] = entry["median_ms"] / merged_ms[pass_]
                    row[pass_] = entry
        rows.append(row)
    return rows


def headline_row(case: Case, fp32_adapters: bool, device, env: dict, quick: bool) -> dict:
    """One headline case: run_case's passes with their summary (ratios,
    targets, floor), then the candidates."""
    if fp32_adapters:
        result = run_fp32_adapter_case(case, device, quick)
    else:
        result = run_case(case, device, quick=quick)
    passes = {}
    for pass_ in PASSES:
        summary = summarize(case, pass_, result[pass_], env)
        if fp32_adapters:  # docs/benchmarks.md: its own target, forward only
            goals = {"fused/merged": ("<=", 1.15)} if pass_ == "forward" and env["device_type"] == "cuda" else {}
            ratios = summary["ratios"]
            summary["targets"] = {fig: list(goal) for fig, goal in goals.items()}
            summary["met"] = {fig: meets(ratios[fig], goal) for fig, goal in goals.items() if ratios.get(fig)}
        passes[pass_] = {"result": {name: compact(entry) for name, entry in result[pass_].items()}, "summary": summary}
    merged_ms = {pass_: result[pass_].get("merged", {}).get("median_ms") for pass_ in PASSES}
    return {"passes": passes, "candidates": time_candidates(case, fp32_adapters, device, quick, merged_ms)}


def _case_info(case: Case, fp32_adapters: bool) -> dict:
    return {**dataclasses.asdict(case), "label": case.label + (" fp32 adapters" if fp32_adapters else ""),
            "adapter_dtype": "fp32" if fp32_adapters else case.dtype}  # fmt: skip


# ---- step 4: the choices -----------------------------------------------------


def shipped_table(device) -> dict:
    """The choices of fused_lora/tuned/<device>.json, if this GPU has one."""
    if device.type != "cuda":
        return {}
    path = tuning.TABLES / f"{tuning.device_slug(device)}.json"
    return json.loads(path.read_text())["choices"] if path.is_file() else {}


def time_choices(problem: Problem, device, table: dict, seen: set) -> list[dict]:
    """Per primitive call of one forward + backward whose key is new: the
    default choice and where it comes from, the heuristic's, every eligible
    candidate's median time (or its error) and the fastest."""
    t = make_tensors(problem, device)
    with recording() as log:
        run_layer(problem, t)
    rows = []
    for c in (c for c in log if c.key not in seen):
        seen.add(c.key)
        times, errors = {}, {}
        for name in c.eligible:
            try:
                with torch.no_grad():  # as the backward runs them: their outputs may be views made without grad
                    times[name] = measure_or_once(lambda i, run=c.run, name=name: lambda: run(name), device, 1, True)
            except Exception:
                errors[name] = traceback.format_exc()
        times = {name: timing.median_ms for name, timing in times.items()}
        fastest = min(times, key=times.get) if times else None
        rows.append({
            "problem": problem.label, "kind": c.kind, "key": c.key, "eligible": c.eligible, "default": c.chosen,
            "default_source": "table" if table.get(c.key) in c.eligible else "heuristic",
            "heuristic": tuning.heuristic(c.kind, c.call, c.m, c.eligible), "times_ms": times, "fastest": fastest,
            "default_over_fastest": times[c.chosen] / times[fastest] if c.chosen in times else None,
            **({"errors": errors} if errors else {}),
        })  # fmt: skip
    return rows


def write_table(path: pathlib.Path, env: dict, command: str, rows: list[dict]) -> dict:
    """The fastest candidate per key, in the format tuning.py reads from
    fused_lora/tuned/<device>.json."""
    table = {
        "device": env["device"],
        "triton": triton.__version__,
        "source": command,
        "choices": {row["key"]: row["fastest"] for row in rows},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


# ---- the proof: budget, steps, the results file ------------------------------


class Proof:
    """The results file and the budget. Each step runs through step(), which
    records its status, duration and rows and rewrites the file."""

    def __init__(self, path: pathlib.Path, env: dict, command: str, budget_s: float, steps):
        self.path, self.budget_s, self.started = path, budget_s, time.time()
        self.data = {"environment": env, "command": command, "budget_s": budget_s,
                     "steps": {name: {"status": "pending"} for name in steps}}  # fmt: skip
        self.stopped = None
        self.save()

    def remaining(self) -> float:
        return self.budget_s - (time.time() - self.started)

    def deadline(self, name: str) -> float:
        """When step `name` stops taking new cases: its share of the budget
        left, split over it and the steps still pending."""
        left = {name} | {s for s, entry in self.data["steps"].items() if entry["status"] == "pending"}
        return time.time() + self.remaining() * SHARES[name] / sum(SHARES[s] for s in left)

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)  # a reader never sees half a file

    def startable(self, name: str) -> bool:
        """Whether step `name` has the time to start; once one has not, no
        later step starts."""
        if self.stopped is None and self.remaining() < MIN_SECONDS[name]:
            left = max(self.remaining(), 0)
            self.stopped = f"out of budget: {left:.0f} s of {self.budget_s:.0f} s left before {name}"
        return self.stopped is None

    def step(self, name: str, fn, deadline: float | None = None):
        """Run fn(entry, deadline), which fills entry["rows"] and saves as it
        goes; an exception is recorded and the next step still runs. A step
        without the time to start is skipped, and so is every later one."""
        entry = self.data["steps"][name]
        if not self.startable(name):
            entry.update(status="skipped", reason=self.stopped)
            self.save()
            print(f"[{name}] skipped: {self.stopped}", flush=True)
            return
        started = time.time()
        entry.update(status="running", rows=[], failed=[])
        print(f"[{name}] {started - self.started:.0f} s into the proof", flush=True)
        try:
            fn(entry, deadline or self.deadline(name))
            entry["status"] = "done"
        except Exception:
            entry.update(status="failed", traceback=traceback.format_exc())
            print(entry["traceback"], flush=True)
        entry["duration_s"] = round(time.time() - started, 1)
        self.save()
        print(f"[{name}] {entry['status']} in {entry['duration_s']} s", flush=True)

    def failures(self) -> list[str]:
        """What keeps the proof from passing: a step not done, a failed check."""
        out = []
        for name, entry in self.data["steps"].items():
            if entry["status"] != "done":
                out.append(f"{name}: {entry['status']}")
            out += [f"{name}: {label}" for label in entry.get("failed", [])]
        return out


@dataclasses.dataclass
class Run:
    """What every step needs."""

    proof: Proof
    plan: Plan
    device: torch.device
    env: dict
    quick: bool  # bench's quick timings (a dry run)
    table_path: pathlib.Path


def compile_ahead(run: Run, steps, jobs: int):
    """Step 1 and the warm-up, in worker processes: the correctness rows
    first, then one run of every kernel the later steps time. The workers
    are gone when this returns, before anything is timed."""
    deadline = run.proof.deadline("correctness")
    if not run.proof.startable(steps[0]):
        steps = []  # no time: the steps record themselves as skipped
    groups = correctness_groups(run.plan, run.device.type, deadline) if "correctness" in steps else []
    warm_up = warm_tasks(run.plan, steps, run.device.type, deadline)
    workers = Workers(max(1, min(jobs, len(groups) + len(warm_up))))
    try:
        group_results = workers.run(run_group, groups)
        warm_results = workers.run(warm, warm_up)

        def correctness(entry, deadline):
            done = {}
            for index, rows in collect(group_results, len(groups), deadline):
                done[index] = rows
                entry["rows"] = [row for i in sorted(done) for row in done[i]]
                run.proof.save()
            unfinished = {"status": "skipped", "reason": "not finished by the deadline"}
            rows = [row for i, g in enumerate(groups) for row in done.get(i, [{"group": g.label, **unfinished}])]
            entry.update(rows=rows, coverage=coverage(rows), skipped=sum(row["status"] == "skipped" for row in rows))
            entry["failed"] = [_row_label(row) for row in rows if row["status"] == "failed" or not row.get("ok", True)]

        if "correctness" in run.proof.data["steps"]:
            run.proof.step("correctness", correctness, deadline)
        started = time.time()
        finished = dict(collect(warm_results, len(warm_up), deadline))
        run.proof.data["warm_up"] = {
            "duration_s": round(time.time() - started, 1),
            "jobs": [finished.get(i, {"label": task.label, **SKIPPED}) for i, task in enumerate(warm_up)],
        }
        run.proof.save()
    finally:
        workers.close()


def headline_step(run: Run, entry: dict, deadline: float):
    for case, fp32_adapters in run.plan.headline:
        info = _case_info(case, fp32_adapters)
        if time.time() > deadline:
            entry["rows"].append({"case": info, **SKIPPED})
            continue
        print(f"  {info['label']} ({case.where})", flush=True)
        try:
            row = {"case": info, "status": "done", **headline_row(case, fp32_adapters, run.device, run.env, run.quick)}
        except Exception:
            row = {"case": info, "status": "failed", "error": traceback.format_exc()}
        entry["rows"].append(row)
        entry["failed"] += [f"{info['label']} {detail}" for detail in _headline_failures(row)]
        run.proof.save()


def multi_adapter_step(run: Run, entry: dict, deadline: float):
    for batch in run.plan.batches:
        label = f"{batch.where} M={batch.m}"
        for count in run.plan.adapter_counts:
            where = {"batch": label, "adapters": count}
            if time.time() > deadline:
                entry["rows"].append({**where, **SKIPPED})
                continue
            print(f"  {label}, {count} adapters", flush=True)
            try:
                result = multi_adapter.time_case(batch, count, run.device, run.quick)
            except Exception:
                entry["rows"].append({**where, "status": "failed", "error": traceback.format_exc()})
                entry["failed"].append(f"{label} n={count}: failed")
                continue
            case = {**dataclasses.asdict(batch), "dtype": str(batch.dtype), "m": batch.m}
            for pass_, entries in result.items():
                t = {name: entries[name].get("median_ms") for name in multi_adapter.IMPLS}
                ratios = {"multi/single": _ratio(t["multi"], t["single"]), "loop/multi": _ratio(t["loop"], t["multi"])}
                result_ = {name: compact(e) for name, e in entries.items()}
                entry["rows"].append({**where, "pass": pass_, "status": "done", "case": case, "result": result_,
                                      "ratios": ratios})  # fmt: skip
                entry["failed"] += [f"{label} n={count} {pass_} {n}" for n, e in entries.items() if not e["check_ok"]]
            run.proof.save()


def choices_step(run: Run, entry: dict, deadline: float):
    table, seen = shipped_table(run.device), set()
    for problem in run.plan.choice_problems():
        if time.time() > deadline:
            entry["rows"].append({"problem": problem.label, **SKIPPED})
            continue
        try:
            rows = time_choices(problem, run.device, table, seen)
        except Exception:
            rows = [{"problem": problem.label, "status": "failed", "error": traceback.format_exc()}]
            entry["failed"].append(f"{problem.label}: failed")
        entry["rows"] += rows
        entry["failed"] += [f"{row['key']} {name}: failed" for row in rows for name in row.get("errors", {})]
        run.proof.save()
    timed = [row for row in entry["rows"] if row.get("fastest")]
    write_table(run.table_path, run.env, run.proof.data["command"], timed)
    entry["table"] = f"tuned/{run.table_path.name}"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_proof", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for the results and the table")
    parser.add_argument("--budget-s", type=float, default=300.0, help="the whole run's time budget (default 300)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: interpreter, tiny shapes, no real timing")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"a comma-separated subset of {','.join(STEPS)}")
    jobs = "worker processes for the correctness rows and the compiles (default: the cores, at most 16)"
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help=jobs)
    args = parser.parse_args(argv)
    asked = args.steps.split(",")
    if not asked or set(asked) - set(STEPS):
        parser.error(f"--steps takes names from {','.join(STEPS)}, got {args.steps!r}")
    args.steps = [s for s in STEPS if s in asked]
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.dry_run != INTERPRETED:
        raise SystemExit("--dry-run needs TRITON_INTERPRET=1 from before triton's import (python -m bench.gpu_proof "
                         "--dry-run sets it), and a GPU run needs it unset")  # fmt: skip
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: the proof needs one (--dry-run runs its steps on the CPU)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    env = {**environment(device), "dry_run": args.dry_run, "ignored_environment": globals().get("IGNORED", {})}
    if args.dry_run:
        env["note"] = DRY_RUN_NOTE
    slug = device_slug(env) + ("-dry-run" if args.dry_run else "")
    proof = Proof(args.out / f"gpu-proof-{slug}.json", env, "python -m bench.gpu_proof " + " ".join(argv),
                  args.budget_s, args.steps)  # fmt: skip
    run = Run(proof, plan(args.dry_run), device, env, args.dry_run, args.out / "tuned" / f"{slug}.json")
    torch.manual_seed(0)
    compile_ahead(run, args.steps, args.jobs)
    for name, fn in (("headline", headline_step), ("multi_adapter", multi_adapter_step), ("choices", choices_step)):
        if name in args.steps:
            proof.step(name, lambda entry, deadline, fn=fn: fn(run, entry, deadline))
    print(f"\nwrote {proof.path}" + (f" and {run.table_path}" if "choices" in args.steps else ""))
    failures = proof.failures()
    if failures:
        more = f" (and {len(failures) - 20} more)" if len(failures) > 20 else ""
        print("NOT PROVEN: " + "; ".join(failures[:20]) + more)
        return 1
    return 0


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _row_label(row: dict) -> str:
    if "group" in row:
        return row["group"]
    return (f"{row['dtype']}/{row['adapter_dtype']} {row['precision']} {row['m']}x{row['k']}x{row['n']} "
            f"{row['adapters']} p{max(row['dropout'])} forced {row['forced']}")  # fmt: skip


def _headline_failures(row: dict) -> list[str]:
    if row["status"] != "done":
        return [] if row["status"] == "skipped" else ["failed"]
    out = [
        f"{pass_} {name}" for pass_, p in row["passes"].items() for name, e in p["result"].items() if not e["check_ok"]
    ]
    return out + [f"forced {c['forced']}" for c in row["candidates"] if not c["check_ok"]]


if __name__ == "__main__":
    sys.exit(main())
