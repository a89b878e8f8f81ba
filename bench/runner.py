"""Run one case: check every implementation against float64, then time it
and measure its memory. An implementation that fails the check gets no time."""

import torch

from fused_lora.reference import within_tolerance

from . import implementations as impl
from .cases import DTYPES, Case
from .timing import measure, measure_all, rotations

PASSES = ("forward", "forward+backward")


def make_inputs(case: Case, device, n_sets: int = 1):
    dtype = DTYPES[case.dtype]
    p = impl.Params.random(case.k, case.n, case.r, dtype, device, dropout_p=case.dropout)
    xs = [torch.randn(case.m, case.k, device=device, dtype=dtype).requires_grad_() for _ in range(n_sets)]
    grad_y = torch.randn(case.m, case.n, device=device, dtype=dtype)
    return p, xs, grad_y


def reference(x, p: impl.Params, grad_y, dropout_factors=None):
    """float64 output and gradients of x, A, B (on x's device: fast on a GPU),
    with the LoRA branch's input multiplied by dropout_factors if given."""
    leaves = [t.detach().double().requires_grad_() for t in (x, p.lora_a, p.lora_b)]
    w, b = p.weight.double(), None if p.bias is None else p.bias.double()
    d = leaves[0] if dropout_factors is None else leaves[0] * dropout_factors
    # The plain formula where the inputs are (lora_linear_reference would move a GPU case to the host).
    y = torch.nn.functional.linear(leaves[0], w, b) + p.scaling * (d @ leaves[1].t()) @ leaves[2].t()
    return y, torch.autograd.grad(y, leaves, grad_y.double())


def check(name, x, p, grad_y, ref, dtype):
    """{"forward": (ok, worst error / allowed), "forward+backward": ...}.
    With dropout the reference is rebuilt with the implementation's own mask."""
    rng_seed = 99
    factors = impl.dropout_factors(name, x, p, rng_seed)
    if factors is not None:
        ref = reference(x, p, grad_y, factors)
    ref_y, ref_grads = ref
    torch.manual_seed(rng_seed)
    y = impl.IMPLEMENTATIONS[name](x, p)
    torch.manual_seed(rng_seed)
    grads = impl.forward_backward(name, x, p, grad_y)
    forward = within_tolerance(y, ref_y, dtype)
    backward = [within_tolerance(g, r, dtype, "gradients") for g, r in zip(grads, ref_grads, strict=False)]
    worst = max([forward[1]] + [b[1] for b in backward])
    return {
        "forward": forward,
        "forward+backward": (forward[0] and all(b[0] for b in backward), worst),
    }


def peak_bytes(name, x, p, grad_y) -> int:
    """Memory a forward + backward needs beyond its inputs. GPU: the peak of
    the caching allocator; CPU (no peak counter): the bytes saved for backward."""
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        impl.forward_backward(name, x, p, grad_y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        impl.IMPLEMENTATIONS[name](x, p)
    inputs = {x.data_ptr(), p.weight.data_ptr(), p.lora_a.data_ptr(), p.lora_b.data_ptr(), p.merged_weight.data_ptr()}
    return sum(size for (ptr, *_), size in saved.items() if ptr not in inputs)


def _forward_call(name, x, p):
    def call():
        with torch.no_grad():  # the forward as inference runs it
            impl.IMPLEMENTATIONS[name](x, p)

    return call


def run_case(case: Case, device, quick=False) -> dict:
    """Every implementation on one case: checks, memory, then timings of the
    ones that passed, side by side."""
    dtype = DTYPES[case.dtype]
    set_bytes = case.m * case.k * torch.finfo(dtype).bits // 8
    n_sets = rotations(set_bytes, device)
    p, xs, grad_y = make_inputs(case, device, n_sets)
    ref = reference(xs[0], p, grad_y)
    result = {pass_: {} for pass_ in PASSES}
    names = [name for name in impl.IMPLEMENTATIONS if impl.applicable(name, p)]
    for name in names:
        checked = check(name, xs[0], p, grad_y, ref, dtype)
        for pass_ in PASSES:
            ok, worst = checked[pass_]
            result[pass_][name] = {"check_ok": ok, "worst_error_over_allowed": worst}
        result["forward+backward"][name]["peak_bytes"] = peak_bytes(name, xs[0], p, grad_y)
    makers = {
        "forward": lambda name: lambda i: _forward_call(name, xs[i], p),
        "forward+backward": lambda name: lambda i: lambda: impl.forward_backward(name, xs[i], p, grad_y),
    }
    for pass_ in PASSES:
        passed = {name: makers[pass_](name) for name in names if result[pass_][name]["check_ok"]}
        for name, timing in measure_all(passed, device, n_sets, quick).items():
            result[pass_][name].update(median_ms=timing.median_ms, spread=timing.spread, samples_ms=timing.samples_ms)
    if device.type == "cuda":
        result["forward"]["triton-base"] = time_triton_base(xs, p, dtype, device, n_sets, quick)
    return result


def time_triton_base(xs, p, dtype, device, n_sets, quick):
    """Our GEMM alone, checked against x W^T + b in float64, then timed."""
    ref = torch.nn.functional.linear(xs[0].double(), p.weight.double(), None if p.bias is None else p.bias.double())
    with torch.no_grad():
        ok, worst = within_tolerance(impl.triton_base(xs[0], p), ref, dtype)
        entry = {"check_ok": ok, "worst_error_over_allowed": worst}
        if ok:
            timing = measure(lambda i: lambda: impl.triton_base(xs[i], p), device, n_sets, quick)
            entry.update(median_ms=timing.median_ms, spread=timing.spread, samples_ms=timing.samples_ms)
    return entry
