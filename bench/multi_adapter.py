"""python -m bench.multi_adapter: what a batch that mixes n LoRA adapters costs.

    python -m bench.multi_adapter            # GPU: bf16, K = N = 4096, r = 16; CPU: torch backend, small sizes
    python -m bench.multi_adapter --quick    # smoke test: tiny shapes, numbers mean nothing

For n = 1, 4, 16, 64 adapters, request b of the batch on adapter b % n:
    decode   M = 16 and 64: one token per request
    prefill  M = 4096: 64 requests of 64 tokens
it checks each implementation against a float64 per-adapter loop, then times:
    multi    fused_lora.multi_lora_linear: the base GEMM and every adapter in
             one launch (adapter_ids on the CPU, as MultiLoRALinear passes
             adapter_names: no device sync)
    loop     PEFT's mixed batch (`_mixed_batch_forward`): the base GEMM, then
             per adapter a gather, two GEMMs and a scatter-add
    single   fused_lora.lora_linear, adapter 0 on every row: the same batch if
             it used one adapter, the floor for multi
the forward (serving) for every batch, forward + backward with W frozen
(training all n adapters at once) for prefill. Prints a table and writes
bench/results/multi-adapter-<device>.json (device, versions, commit, date,
every raw timing).
"""

import argparse
import dataclasses
import pathlib
import sys

import torch

import fused_lora
from fused_lora.reference import peft_mixed_batch, within_tolerance

from .report import device_slug, environment, failed_checks, write_json
from .timing import measure, rotations

RESULTS = pathlib.Path(__file__).parent / "results"
ADAPTER_COUNTS = (1, 4, 16, 64)
IMPLS = ("multi", "loop", "single")


@dataclasses.dataclass(frozen=True)
class Batch:
    requests: int
    tokens: int  # per request
    k: int
    n: int
    r: int
    dtype: torch.dtype
    where: str
    backward: bool = False  # also time forward + backward

    @property
    def m(self) -> int:
        return self.requests * self.tokens


def preset(on_gpu: bool, quick: bool):
    if quick:
        k, dtype = 256, torch.bfloat16 if on_gpu else torch.float32
        return [Batch(16, 1, k, k, 8, dtype, "decode"), Batch(16, 16, k, k, 8, dtype, "prefill", backward=True)]
    if on_gpu:
        k, tokens, dtype = 4096, 64, torch.bfloat16
    else:  # CPU: the torch backend at sizes that run in about a minute on 2 cores
        k, tokens, dtype = 1024, 16, torch.float32
    return [
        Batch(16, 1, k, k, 16, dtype, "decode"),
        Batch(64, 1, k, k, 16, dtype, "decode"),
        Batch(64, tokens, k, k, 16, dtype, "prefill", backward=True),
    ]


@dataclasses.dataclass
class Layer:
    """One base layer with n adapters and the batch's assignment."""

    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: list
    lora_b: list
    scalings: list
    adapter_ids: torch.Tensor  # (requests,), on the CPU

    @classmethod
    def random(cls, batch: Batch, adapters: int, device):
        def randn(*shape, scale):
            return (torch.randn(*shape, device=device) * scale).to(batch.dtype)

        return cls(
            weight=randn(batch.n, batch.k, scale=batch.k**-0.5),
            bias=randn(batch.n, scale=1.0),
            lora_a=[randn(batch.r, batch.k, scale=batch.k**-0.5).requires_grad_() for _ in range(adapters)],
            lora_b=[randn(batch.n, batch.r, scale=batch.r**-0.5).requires_grad_() for _ in range(adapters)],
            scalings=[2.0] * adapters,
            adapter_ids=torch.arange(batch.requests) % adapters,
        )

    def adapters(self, name):
        """The adapter tensors the implementation differentiates."""
        return self.lora_a[:1] + self.lora_b[:1] if name == "single" else self.lora_a + self.lora_b


def run(name, x, layer: Layer):
    if name == "multi":
        args = (layer.lora_a, layer.lora_b, layer.scalings, layer.adapter_ids)
        return fused_lora.multi_lora_linear(x, layer.weight, layer.bias, *args)
    if name == "loop":
        return peft_mixed_batch(
            x, layer.weight, layer.bias, layer.lora_a, layer.lora_b, layer.scalings, layer.adapter_ids
        )
    return fused_lora.lora_linear(x, layer.weight, layer.bias, layer.lora_a[0], layer.lora_b[0], layer.scalings[0])


def forward_backward(name, x, layer, grad_y):
    """y, then the gradients of x and of the adapters the implementation uses."""
    y = run(name, x, layer)
    return y, torch.autograd.grad(y, [x, *layer.adapters(name)], grad_y)


def reference(name, x, layer, grad_y):
    """The float64 per-adapter loop on x's device (every row on adapter 0 for
    `single`): output and gradients."""
    ids = torch.zeros_like(layer.adapter_ids) if name == "single" else layer.adapter_ids
    leaves = [t.detach().double().requires_grad_() for t in (x, *layer.lora_a, *layer.lora_b)]
    n = len(layer.lora_a)
    y = peft_mixed_batch(
        leaves[0], layer.weight.double(), layer.bias.double(), leaves[1 : 1 + n], leaves[1 + n :], layer.scalings, ids
    )
    grads = torch.autograd.grad(y, leaves, grad_y.double(), allow_unused=True)
    used = [0, *range(1, 2 + n, n)] if name == "single" else range(len(leaves))  # x, A_0, B_0 for single
    return y, [grads[i] for i in used]


def check(name, x, layer, grad_y, batch):
    """{pass: (ok, worst error / allowed)}: the forward, and forward + backward
    where the batch times it (every adapter has rows there)."""
    ref_y, ref_grads = reference(name, x, layer, grad_y)
    if not batch.backward:
        with torch.no_grad():
            return {"forward": within_tolerance(run(name, x, layer), ref_y, batch.dtype)}
    y, grads = forward_backward(name, x, layer, grad_y)
    forward = within_tolerance(y, ref_y, batch.dtype)
    backward = [within_tolerance(g, r, batch.dtype, "gradients") for g, r in zip(grads, ref_grads, strict=True)]
    return {
        "forward": forward,
        "forward+backward": (forward[0] and all(ok for ok, _ in backward), max(w for _, w in [forward, *backward])),
    }


def time_case(batch: Batch, adapters: int, device, quick: bool) -> dict:
    layer = Layer.random(batch, adapters, device)
    n_sets = rotations(batch.m * batch.k * batch.dtype.itemsize, device)
    xs = [torch.randn(batch.requests, batch.tokens, batch.k, device=device, dtype=batch.dtype) for _ in range(n_sets)]
    xs = [x.requires_grad_() for x in xs]
    grad_y = torch.randn(batch.requests, batch.tokens, batch.n, device=device, dtype=batch.dtype)
    passes = ("forward", "forward+backward") if batch.backward else ("forward",)
    result = {pass_: {} for pass_ in passes}
    for name in IMPLS:
        checked = check(name, xs[0], layer, grad_y, batch)
        for pass_ in passes:
            ok, worst = checked[pass_]
            entry = {"check_ok": ok, "worst_error_over_allowed": worst}
            if ok:
                if pass_ == "forward":

                    def make(i, name=name):
                        return lambda: run(name, xs[i], layer)

                    with torch.no_grad():
                        timing = measure(make, device, n_sets, quick)
                else:

                    def make(i, name=name):
                        return lambda: forward_backward(name, xs[i], layer, grad_y)

                    timing = measure(make, device, n_sets, quick)
                entry.update(median_ms=timing.median_ms, spread=timing.spread, samples_ms=timing.samples_ms)
            result[pass_][name] = entry
    return result


def _ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}"


def table(rows) -> str:
    header = f"{'batch':<16} {'pass':<5} {'adapters':>8} " + " ".join(f"{n + ' ms':>10}" for n in IMPLS)
    header += f" {'multi/single':>13} {'loop/multi':>11}"
    lines = [header, "-" * len(header)]
    for row in rows:
        t = {n: row["result"][n].get("median_ms") if row["result"][n]["check_ok"] else None for n in IMPLS}
        times = " ".join(f"{'FAILED' if t[n] is None else f'{t[n]:.4f}':>10}" for n in IMPLS)
        lines.append(
            f"{row['batch']:<16} {'fwd' if row['pass'] == 'forward' else 'f+b':<5} {row['adapters']:>8} {times}"
            f" {_ratio(t['multi'], t['single']):>13} {_ratio(t['loop'], t['multi']):>11}"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.multi_adapter", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions: a smoke test")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for the JSON file")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    env = environment(device)
    if not on_gpu:
        # Never time the interpreter: on a CPU the fused ops run the torch backend.
        fused_lora.set_backend("torch")
        env["note"] = "CPU numbers: multi and single are the torch backend; no Triton kernel is timed."
        print(env["note"])
    torch.manual_seed(0)
    counts = ADAPTER_COUNTS[:2] if args.quick else ADAPTER_COUNTS
    rows = []
    for batch in preset(on_gpu, args.quick):
        label = f"{batch.where} M={batch.m}"
        for adapters in counts:
            print(f"{label}, {adapters} adapters ...", flush=True)
            result = time_case(batch, adapters, device, args.quick)
            for pass_, entries in result.items():
                case = {**dataclasses.asdict(batch), "dtype": str(batch.dtype), "m": batch.m}
                rows.append(dict(batch=label, adapters=adapters, pass_=pass_, case=case, result=entries))
    for row in rows:
        row["pass"] = row.pop("pass_")
    print()
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{'quick-' if args.quick else ''}multi-adapter-{device_slug(env)}.json"
    write_json(path, env, rows, "python -m bench.multi_adapter " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"\nwrote {path}")
    failed = failed_checks(rows, lambda row: f"{row['batch']} n={row['adapters']}")
    if failed:
        print("FAILED the accuracy check (not timed): " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
