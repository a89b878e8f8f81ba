"""python -m bench.variants: LoRA over a quantized base (QLoRA's NF4, FP8) and DoRA, against the ways others run them.

    python -m bench.variants            # GPU: bf16, 4096 x 4096 x 4096 and decode M = 16, r = 16; CPU: small shapes
    python -m bench.variants --quick    # smoke test: tiny shapes, few repetitions, numbers mean nothing

Per variant, on the same inputs:

    nf4   fused           fused_lora.lora_linear on a QuantizedWeight (W decoded tile by tile in the kernels)
          dequant-cublas  Unsloth's way: W decoded into a temporary, then addmm, shrink, addmm_ (cuBLAS);
                          decoded again in the backward, never kept
          peft-qlora      PEFT's QLoRA layer: peft.tuners.lora.bnb.Linear4bit over bitsandbytes.nn.Linear4bit
          merged-bf16     one dense GEMM with W + s B A merged in the compute dtype: the speed to aim at
    fp8   fused, dequant-cublas, merged-bf16 (e4m3, 128 x 128 block scales)
    dora  fused           fused_lora.functional.dora_linear (the magnitude m trainable)
          peft-dora       PEFT's lora.Linear with use_dora=True, holding our A, B and m
          merged          one dense GEMM with (m / n) (W + s B A)

The NF4 weight is bitsandbytes' own (quantize_4bit with nested statistics,
as QLoRA stores it) when bitsandbytes is importable, so that every
implementation reads the same bits; else fused_lora.quantized.quantize_nf4's.
An implementation whose package is missing is recorded as unavailable.

Each case is run for the forward (under no_grad, as inference runs it) and
for forward + backward with W frozen (the gradients of x, A, B and DoRA's
magnitude; the merged layers have only x's). Every implementation is first
checked against float64 (fused_lora.reference.within_tolerance); one that
fails gets no time. Timed side by side as `python -m bench` times
(bench.timing); memory: the bytes saved for the backward (any device) and,
on a GPU, the allocator's peak over a forward + backward. Writes
bench/results/variants-<device>.json (environment, command, every raw timing).
"""

import argparse
import dataclasses
import functools
import importlib.metadata
import pathlib
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fused_lora
from fused_lora.functional import dora_linear
from fused_lora.quantized import FP8_BLOCK, QuantizedWeight, quantize_fp8, quantize_nf4
from fused_lora.reference import within_tolerance

from .cases import DTYPES, meets
from .report import device_slug, environment, failed_checks, write_json
from .runner import PASSES
from .timing import measure_all, rotations

RESULTS = pathlib.Path(__file__).parent / "results"
VARIANTS = ("nf4", "fp8", "dora")
IMPLS = {
    "nf4": ("fused", "dequant-cublas", "peft-qlora", "merged-bf16"),
    "fp8": ("fused", "dequant-cublas", "merged-bf16"),
    "dora": ("fused", "peft-dora", "merged"),
}
# (numerator, denominator) of each time ratio; on forward + backward the same pairs of memory.
RATIOS = {
    "nf4": (("peft-qlora", "fused"), ("dequant-cublas", "fused"), ("fused", "merged-bf16")),
    "fp8": (("dequant-cublas", "fused"), ("fused", "merged-bf16")),
    "dora": (("peft-dora", "fused"), ("fused", "merged")),
}
SCALING = 2.0  # lora_alpha / r, as bench.implementations.Params


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: x (m, k), W (n, k), rank r, in dtype, of a variant of VARIANTS."""

    variant: str
    m: int
    k: int
    n: int
    r: int
    dtype: str
    where: str = ""

    @property
    def label(self) -> str:
        return f"{self.variant} {self.m}x{self.k}x{self.n} r{self.r} {self.dtype}"


def preset(on_gpu: bool, quick: bool) -> list[Case]:
    """GPU: the headline 4096^3 and decode M = 16 (bf16, r = 16). CPU: one
    small shape per variant, about a minute in all on 2 cores. Quick: tiny
    shapes. K and N stay multiples of 128 (FP8's scale blocks)."""
    if quick:
        shapes = [(16, 256, 256, 8, "quick decode"), (64, 256, 384, 8, "quick prefill")]
    elif on_gpu:
        shapes = [(4096, 4096, 4096, 16, "prefill / training, attention projection"),
                  (16, 4096, 4096, 16, "decode batch, attention projection")]  # fmt: skip
    else:
        shapes = [(1024, 1024, 1024, 16, "CPU preset")]
    return [Case(variant, m, k, n, r, "bf16", where) for variant in VARIANTS for m, k, n, r, where in shapes]


def targets(case: Case, pass_: str, on_gpu: bool) -> dict:
    """{ratio: (comparison, bound)} from docs/benchmarks.md: GPU, bf16 only."""
    if not on_gpu or case.dtype != "bf16":
        return {}
    if case.variant == "nf4" and pass_ == "forward+backward" and case.m >= 4096:
        return {"peft-qlora/fused": (">=", 1.30)}
    if case.variant == "nf4" and pass_ == "forward" and case.m <= 16:
        return {"peft-qlora/fused": (">=", 1.50)}
    if case.variant == "dora" and pass_ == "forward+backward":
        return {"peft-dora/fused": (">=", 1.50)}
    return {}


# ---- the layer and the ways to run it ----------------------------------------


@dataclasses.dataclass
class Layer:
    """One case's frozen base and trainable adapter. weight: W (N, K) dense,
    what was quantized (NF4 / FP8) or DoRA's base; quantized: the stored
    base; bnb_weight: bitsandbytes' Params4bit holding the same bits;
    magnitude and weight_norm_sq (||W_j||^2, cached as a layer would): DoRA."""

    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    quantized: QuantizedWeight | None = None
    bnb_weight: object = None
    magnitude: torch.Tensor | None = None
    weight_norm_sq: torch.Tensor | None = None

    def base(self) -> torch.Tensor:
        """W as every implementation computes with it: the decoded base, in the compute dtype."""
        return self.weight if self.quantized is None else self.quantized.dequantize()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds."""
        held = [self.weight, self.bias, self.lora_a, self.lora_b, self.magnitude, self.weight_norm_sq]
        if self.quantized is not None:
            held += [self.quantized.data, *self.quantized.parts()]
        return [t for t in held if t is not None]


@dataclasses.dataclass
class Impl:
    """One way to run a case's layer: y = run(x); forward + backward
    differentiates x and `params` (in the reference's order: A, B, m);
    `held`: the tensors it holds, which are not memory saved for the backward."""

    run: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]
    held: list[torch.Tensor]


class DequantizedLoRA(torch.autograd.Function):
    """Unsloth's QLoRA path (bench.implementations.ComposedLoRA's GEMMs on a
    decoded W): W = decode() into a temporary in the forward and again in
    the backward, so only x, A, B and x A^T are kept between them.

    forward:  y = addmm(b, x, W^T);  y.addmm_(x A^T, B^T, alpha=s)
    backward: dX = dY W;  dX.addmm_(dY B, A, alpha=s);  dA = s (dY B)^T x;  dB = s dY^T (x A^T)
    """

    @staticmethod
    def forward(ctx, x, decode, bias, lora_a, lora_b, scaling):
        x2d = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, x2d, decode().t())
        xa = torch.mm(x2d, lora_a.t())
        y.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2d, lora_a, lora_b, xa)
        ctx.decode, ctx.scaling, ctx.x_shape = decode, scaling, x.shape
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, lora_a, lora_b, xa = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        dyb = torch.mm(dy, lora_b)
        dx = torch.mm(dy, ctx.decode())
        dx.addmm_(dyb, lora_a, alpha=ctx.scaling)
        da = torch.mm(dyb.t(), x2d).mul_(ctx.scaling)
        db = torch.mm(dy.t(), xa).mul_(ctx.scaling)
        return dx.view(ctx.x_shape), None, None, da, db, None


def decode_fp8_blocks(q: QuantizedWeight) -> torch.Tensor:
    """W from FP8 with 128 x 128 block scales, broadcast instead of expanded
    (the preset's K and N are multiples of 128): the same fp32 products as
    q.dequantize(), without its N x K scale temporary."""
    rows, cols = q.scale.shape
    w = q.data.float().view(rows, FP8_BLOCK, cols, FP8_BLOCK) * q.scale[:, None, :, None]
    return w.view(q.shape).to(q.dtype)


def _bitsandbytes():
    """bitsandbytes, or None when it cannot be imported."""
    try:
        import bitsandbytes
    except Exception:  # not installed, or installed without a usable backend for this machine
        return None
    return bitsandbytes


def make_layer(case: Case, device) -> Layer:
    """Random W (n, k), bias (n,), A (r, k), B (n, r) (nonzero: a trained
    adapter) in the case's dtype, then the variant's base: W quantized, or
    DoRA's magnitude m (n,) and cached ||W_j||^2 (n,) fp32."""
    dtype = DTYPES[case.dtype]

    def randn(*shape, scale):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    layer = Layer(
        weight=randn(case.n, case.k, scale=case.k**-0.5),
        bias=randn(case.n, scale=1.0),
        lora_a=randn(case.r, case.k, scale=case.k**-0.5).requires_grad_(),
        lora_b=randn(case.n, case.r, scale=case.r**-0.5).requires_grad_(),  # never zero: a trained adapter
    )
    bnb = _bitsandbytes() if case.variant == "nf4" else None
    if bnb is not None:
        # As PEFT re-quantizes a weight: a Params4bit on the CPU, quantized by moving it to the device.
        params = bnb.nn.Params4bit(layer.weight.cpu(), requires_grad=False, quant_type="nf4", blocksize=64,
                                   compress_statistics=True).to(device)  # fmt: skip
        state = params.quant_state
        layer.bnb_weight = params
        layer.quantized = QuantizedWeight(
            "nf4", params.data.reshape(-1), (case.n, case.k), dtype, absmax=state.absmax, code=state.code,
            blocksize=state.blocksize, nested_absmax=state.state2.absmax, nested_code=state.state2.code,
            nested_offset=torch.as_tensor(state.offset, device=device).reshape(()),
            nested_blocksize=state.state2.blocksize,
        )  # fmt: skip
    elif case.variant == "nf4":
        layer.quantized = quantize_nf4(layer.weight)
    elif case.variant == "fp8":
        layer.quantized = quantize_fp8(layer.weight)
    else:
        w = layer.weight.double()
        norm = torch.linalg.norm(w + SCALING * layer.lora_b.detach().double() @ layer.lora_a.detach().double(), dim=1)
        # A trained magnitude: near its initial value ||W + s B A||, not equal to it.
        layer.magnitude = (norm * (0.5 + torch.rand(case.n, device=device, dtype=torch.float64))).to(dtype)
        layer.magnitude.requires_grad_()
        layer.weight_norm_sq = w.square().sum(1).float()
    return layer


def _merged(layer: Layer) -> Impl:
    """One dense GEMM with the adapter (and DoRA's column scale) folded into
    W in fp32, rounded once to the compute dtype."""
    w = layer.base().float() + SCALING * layer.lora_b.detach().float() @ layer.lora_a.detach().float()
    if layer.magnitude is not None:
        w = w * (layer.magnitude.detach().float() / torch.linalg.norm(w, dim=1))[:, None]
    merged = w.to(layer.weight.dtype)
    return Impl(lambda x: F.linear(x, merged, layer.bias), [], [merged, layer.bias])


def _peft_qlora(layer: Layer, case: Case) -> Impl:
    """PEFT's QLoRA layer over a bitsandbytes Linear4bit holding our NF4 bits,
    with a copy of our A and B."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit

    dtype = layer.weight.dtype
    base = bnb.nn.Linear4bit(case.k, case.n, bias=True, compute_dtype=dtype, quant_type="nf4")
    base.weight = layer.bnb_weight
    base.bias = torch.nn.Parameter(layer.bias, requires_grad=False)
    config = LoraConfig(r=case.r, lora_alpha=SCALING * case.r, init_lora_weights=False)
    module = Linear4bit(base, "default", config, r=case.r, lora_alpha=SCALING * case.r)
    # Training mode throughout: in eval mode bitsandbytes would repack the weight for its CPU kernel, in place.
    return _with_our_adapter(module, layer)


def _peft_dora(layer: Layer, case: Case) -> Impl:
    """PEFT's DoRA layer over an nn.Linear holding our W and bias, with a copy of our A, B and m."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    base = torch.nn.Linear(case.k, case.n, device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        base.weight.copy_(layer.weight)
        base.bias.copy_(layer.bias)
    base.requires_grad_(False)
    config = LoraConfig(r=case.r, lora_alpha=SCALING * case.r, use_dora=True, init_lora_weights=False)
    module = Linear(base, "default", config, r=case.r, lora_alpha=SCALING * case.r)
    return _with_our_adapter(module, layer)


def _with_our_adapter(module, layer: Layer) -> Impl:
    """A PEFT layer's adapter (and magnitude) set to ours, in our dtype."""
    ours = [layer.lora_a, layer.lora_b] + ([layer.magnitude] if layer.magnitude is not None else [])
    theirs = [module.lora_A["default"].weight, module.lora_B["default"].weight]
    if layer.magnitude is not None:
        theirs.append(module.lora_magnitude_vector["default"].weight)
    for param, value in zip(theirs, ours, strict=True):
        param.data = value.detach().clone()
    return Impl(module, theirs, [*module.parameters(), *layer.tensors()])


def _decoder(layer: Layer):
    """() -> W in the compute dtype, as dequant-cublas decodes it: bitsandbytes'
    own kernel for its NF4 weight (as Unsloth calls it), else in torch."""
    q = layer.quantized
    if q.format == "fp8":
        return functools.partial(decode_fp8_blocks, q)
    if layer.bnb_weight is not None:
        from bitsandbytes.functional import dequantize_4bit

        return functools.partial(dequantize_4bit, layer.bnb_weight.data, layer.bnb_weight.quant_state)
    return q.dequantize


def implementations(case: Case, layer: Layer) -> tuple[dict, dict]:
    """({name: Impl} of those that can run here, {name: why not} of the others)."""
    bias, a, b, held = layer.bias, layer.lora_a, layer.lora_b, layer.tensors()
    impls, builders, missing = {}, {}, {}
    if case.variant == "dora":
        m, norm_sq = layer.magnitude, layer.weight_norm_sq

        def fused(x):
            return dora_linear(x, layer.weight, bias, a, b, SCALING, m, weight_norm_sq=norm_sq)

        impls["fused"] = Impl(fused, [a, b, m], held)
        impls["merged"] = _merged(layer)
        builders["peft-dora"] = _peft_dora
    else:
        q, decode = layer.quantized, _decoder(layer)
        impls["fused"] = Impl(lambda x: fused_lora.lora_linear(x, q, bias, a, b, SCALING), [a, b], held)
        impls["dequant-cublas"] = Impl(lambda x: DequantizedLoRA.apply(x, decode, bias, a, b, SCALING), [a, b], held)
        impls["merged-bf16"] = _merged(layer)
        if case.variant == "nf4" and layer.bnb_weight is None:
            missing["peft-qlora"] = "bitsandbytes is not importable"
        elif case.variant == "nf4":
            builders["peft-qlora"] = _peft_qlora
    for name, build in builders.items():
        try:
            impls[name] = build(layer, case)
        except ImportError as error:  # peft is not installed
            missing[name] = f"{type(error).__name__}: {error}"
    return {name: impls[name] for name in IMPLS[case.variant] if name in impls}, missing


# ---- check, memory, timing ---------------------------------------------------


def reference(layer: Layer, x, grad_y) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """float64 y and the gradients of x, A, B (and m), on x's device. DoRA:
    y = (m / n) (x W^T + s (x A^T) B^T) + b with n = ||W + s B A|| row-wise,
    a constant of the backward (as PEFT has it)."""
    trainable = [x, layer.lora_a, layer.lora_b] + ([layer.magnitude] if layer.magnitude is not None else [])
    leaves = [t.detach().double().requires_grad_() for t in trainable]
    x64, a, b = leaves[:3]
    w = layer.base().double()
    z = x64 @ w.t() + SCALING * (x64 @ a.t()) @ b.t()
    if layer.magnitude is not None:
        norm = torch.linalg.norm(w + SCALING * b.detach() @ a.detach(), dim=1)
        z = z * (leaves[3] / norm)
    y = z + layer.bias.double()
    return y, list(torch.autograd.grad(y, leaves, grad_y.double()))


def forward_backward(impl: Impl, x, grad_y):
    """y, then the gradients of x and impl.params (returned, not accumulated:
    repeated calls do the same work)."""
    y = impl.run(x)
    return y, torch.autograd.grad(y, [x, *impl.params], grad_y)


def check(impl: Impl, x, grad_y, ref, dtype) -> dict:
    """{pass: (ok, worst error / allowed)}: the no-grad forward that is timed,
    and forward + backward (y and every gradient it computes)."""
    ref_y, ref_grads = ref
    with torch.no_grad():
        forward = within_tolerance(impl.run(x), ref_y, dtype)
    y, grads = forward_backward(impl, x, grad_y)
    checks = [within_tolerance(y, ref_y, dtype)]
    checks += [within_tolerance(g, r, dtype, "gradients") for g, r in zip(grads, ref_grads, strict=False)]
    return {"forward": forward, "forward+backward": (all(ok for ok, _ in checks), max(w for _, w in checks))}


def saved_bytes(impl: Impl, x) -> int:
    """Bytes the forward keeps for the backward beyond what the layer holds
    and x: every storage a saved tensor uses, counted once."""
    held = {t.untyped_storage().data_ptr() for t in [x, *impl.held]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        impl.run(x)
    return sum(saved.values())


def peak_bytes(impl: Impl, x, grad_y) -> int:
    """GPU: the caching allocator's peak over a forward + backward, beyond
    what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward(impl, x, grad_y)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run_case(case: Case, device, quick=False) -> dict:
    """Every implementation on one case: checks, memory, then timings of
    those that passed, side by side. {"result": {pass: {name: entry}},
    "unavailable": {name: why}, "details": {...}}."""
    dtype = DTYPES[case.dtype]
    layer = make_layer(case, device)
    n_sets = rotations(case.m * case.k * dtype.itemsize, device)
    xs = [torch.randn(case.m, case.k, device=device, dtype=dtype).requires_grad_() for _ in range(n_sets)]
    grad_y = torch.randn(case.m, case.n, device=device, dtype=dtype)
    impls, missing = implementations(case, layer)
    ref = reference(layer, xs[0], grad_y)
    result = {pass_: {} for pass_ in PASSES}
    for name, impl in impls.items():
        for pass_, (ok, worst) in check(impl, xs[0], grad_y, ref, dtype).items():
            result[pass_][name] = {"check_ok": ok, "worst_error_over_allowed": worst}
        memory = result["forward+backward"][name]
        memory["saved_bytes"] = saved_bytes(impl, xs[0])
        if device.type == "cuda":
            memory["peak_bytes"] = peak_bytes(impl, xs[0], grad_y)

    def forward(impl):
        def make(i):
            def call():
                with torch.no_grad():  # the forward as inference runs it
                    impl.run(xs[i])

            return call

        return make

    makers = {
        "forward": forward,
        "forward+backward": lambda impl: lambda i: lambda: forward_backward(impl, xs[i], grad_y),
    }
    for pass_ in PASSES:
        passed = {name: makers[pass_](impl) for name, impl in impls.items() if result[pass_][name]["check_ok"]}
        for name, timing in measure_all(passed, device, n_sets, quick).items():
            result[pass_][name].update(median_ms=timing.median_ms, spread=timing.spread, samples_ms=timing.samples_ms)
    details = {}
    if layer.quantized is not None:
        details["base_bytes"] = layer.quantized.nbytes
        details["dense_base_bytes"] = layer.weight.numel() * layer.weight.element_size()
    if case.variant == "nf4":
        from_bnb = layer.bnb_weight is not None
        details["nf4_weight"] = (
            "bitsandbytes quantize_4bit (blocksize 64, nested statistics)" if from_bnb else "fused_lora quantize_nf4"
        )
        details["dequant-cublas_decode"] = (
            "bitsandbytes.functional.dequantize_4bit" if from_bnb else "QuantizedWeight.dequantize"
        )
    return {"result": result, "unavailable": missing, "details": details}


def summarize(case: Case, pass_: str, pass_result: dict, on_gpu: bool) -> dict:
    """The ratios of RATIOS (time; on forward + backward also `saved` and,
    on a GPU, `peak` memory), the targets and whether each is met."""
    ratios = {}
    fields = [("", "median_ms")]
    if pass_ == "forward+backward":
        fields += [("saved ", "saved_bytes"), ("peak ", "peak_bytes")]
    for prefix, field in fields:
        for top, bottom in RATIOS[case.variant]:
            a, b = (pass_result.get(name, {}).get(field) for name in (top, bottom))
            if a is not None and b:
                ratios[f"{prefix}{top}/{bottom}"] = a / b
    goals = targets(case, pass_, on_gpu)
    return {
        "ratios": ratios,
        "targets": {fig: list(goal) for fig, goal in goals.items()},
        "met": {fig: meets(ratios[fig], goal) for fig, goal in goals.items() if fig in ratios},
    }


# ---- the command -------------------------------------------------------------


def _ms(entry) -> str:
    if entry is None:
        return "n/a"
    return f"{entry['median_ms']:.3f}" if entry["check_ok"] else "FAILED"


def _ratio(fig: str, value: float, goals: dict) -> str:
    if fig not in goals:
        return f"{fig} {value:.2f}"
    return f"{fig} {value:.2f} ({goals[fig][0]}{goals[fig][1]:g} {'ok' if meets(value, goals[fig]) else 'MISS'})"


def table(rows: list[dict]) -> str:
    """The printed report: per case and pass, the times, then the ratios with their targets."""
    lines = []
    for row in rows:
        times = "  ".join(f"{name} {_ms(row['result'].get(name))}" for name in IMPLS[row["case"]["variant"]])
        summary = row["summary"]
        ratios = "  ".join(_ratio(fig, value, summary["targets"]) for fig, value in summary["ratios"].items())
        pass_ = "fwd" if row["pass"] == "forward" else "f+b"
        lines += [f"{row['case']['label']:<30} {pass_}  ms: {times}", f"{'':<36}{ratios}"]
    return "\n".join(lines)


def _versions() -> dict:
    """The versions of the packages the baselines come from (None: not installed)."""
    out = {}
    for package in ("peft", "bitsandbytes", "transformers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def main(argv=None):
    """Run the preset (or --quick), print the table, write the JSON; 1 if a check failed."""
    parser = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions: a smoke test")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for the JSON file")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    env = {**environment(device), "packages": _versions(), "torch_threads": torch.get_num_threads()}
    if not on_gpu:
        # Never time the interpreter: on a CPU `fused` is the torch backend.
        fused_lora.set_backend("torch")
        env["note"] = (
            "CPU numbers: `fused` is the torch backend (the base decoded into a temporary, as dequant-cublas does); "
            "no Triton kernel is timed, and peft-qlora runs bitsandbytes' CPU path"
        )
        print(env["note"])
    torch.manual_seed(0)
    cases = preset(on_gpu, args.quick)
    rows, started = [], time.time()
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.label} ({case.where}) ... {time.time() - started:.0f}s", flush=True)
        out = run_case(case, device, args.quick)
        for pass_ in PASSES:
            rows.append({
                "case": {**dataclasses.asdict(case), "label": case.label}, "pass": pass_,
                "result": out["result"][pass_], "unavailable": out["unavailable"], "details": out["details"],
                "summary": summarize(case, pass_, out["result"][pass_], on_gpu),
            })  # fmt: skip
    print()
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{'quick-' if args.quick else ''}variants-{device_slug(env)}.json"
    write_json(path, env, rows, "python -m bench.variants " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"\nwrote {path}")
    unavailable = sorted({f"{name} ({why})" for row in rows for name, why in row["unavailable"].items()})
    if unavailable:
        print("unavailable here: " + "; ".join(unavailable))
    failed = failed_checks(rows, lambda row: row["case"]["label"])
    if failed:
        print("FAILED the accuracy check (not timed): " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
