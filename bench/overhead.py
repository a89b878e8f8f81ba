"""python -m bench.overhead: host time per call, in microseconds.

    python -m bench.overhead                 # CPU, torch backend, plus torch.compile (about a minute)
    python -m bench.overhead --no-compile    # eager rows only
    python -m bench.overhead --device cuda   # host time of the launches (the GPU work is queued, not waited for)

A decode step gives a LoRA layer a few microseconds of GPU work, so the
Python in front of the kernels matters. Tiny shapes (M = 1, K = N = 64,
r = 8, fp32) make every row measure call overhead, not arithmetic. Each row
is the best of several rounds of the mean over many calls: other processes
on the machine only ever make a round slower.
"""

import argparse
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

import fused_lora
from fused_lora import ops
from fused_lora.backends import select
from fused_lora.batch import Adapters

from .report import device_slug, environment, write_json


def per_call_us(rows, device: str, calls: int = 500, rounds: int = 15) -> dict[str, float]:
    """{name: best over `rounds` of the mean host time of `calls` calls}. The
    rows take turns within each round, so a burst of load from elsewhere
    slows one round of every row rather than every round of one row."""
    best = {}
    for _ in range(rounds):
        for name, fn, grad in rows:
            with torch.set_grad_enabled(grad):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                elapsed = (time.perf_counter() - start) / calls * 1e6
            best[name] = min(best.get(name, float("inf")), elapsed)
    return best


def _peft_layer(k, n, r, device):
    """PEFT's own lora.Linear over an nn.Linear (the module a PEFT model holds), or None without peft."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        return None
    config = LoraConfig(r=r, lora_alpha=r, init_lora_weights=False)
    return PeftLinear(torch.nn.Linear(k, n, device=device), "default", config, r=r, lora_alpha=r)


def _training_step(module, x):
    def step():
        module(x).sum().backward()

    return step


def rows(device: str, compile_: bool, m: int = 1, k: int = 64, n: int = 64, r: int = 8) -> list:
    """(name, fn, grad enabled) for each way of computing one forward, and
    for a training step (forward + backward of A and B)."""
    x = torch.randn(m, k, device=device)
    layer = fused_lora.LoRALinear(k, n, r=r, init_lora_weights=False, device=device).eval()
    w, b, a, bb, s = layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scaling
    linear = torch.nn.Linear(k, n, device=device)
    adapters = Adapters([a], [bb], layer._scalings, [0.0])
    backend = select(x)
    table = [
        ("F.linear (the floor)", lambda: F.linear(x, w, b), False),
        ("nn.Linear (a module's floor)", lambda: linear(x), False),
        (
            f"{backend.__name__.rsplit('.', 1)[1]}.forward (no checks)",
            lambda: backend.forward(x, w, b, adapters, None),
            False,
        ),
        ("lora_linear, inference", lambda: fused_lora.lora_linear(x, w, b, a, bb, s), False),
        ("LoRALinear, eval", lambda: layer(x), False),
    ]
    peft = _peft_layer(k, n, r, device)
    if peft is not None:
        peft.eval()
        table.insert(2, ("PEFT lora.Linear, eval", lambda: peft(x), False))
        table.append(("PEFT lora.Linear, training step", _training_step(peft, x), True))
    table.append(("LoRALinear, training step", _training_step(layer, x), True))
    table.append(
        (
            "custom op, training (what compiled code calls)",
            lambda: ops.lora_forward(
                x, w, b, [a], [bb], layer._scalings, [0.0], None, None, None, None, "auto", "dense", [], None, False
            ),
            True,
        )
    )
    if compile_:
        compiled_linear = torch.compile(linear, fullgraph=True)
        compiled = torch.compile(layer, fullgraph=True)
        with torch.no_grad():
            compiled_linear(x), compiled(x)  # compile outside the timing
        table.append(("nn.Linear, torch.compile (a compiled call's floor)", lambda: compiled_linear(x), False))
        table.append(("LoRALinear, eval, torch.compile (Inductor)", lambda: compiled(x), False))
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--backend", default=None, choices=["torch", "triton"], help="default: auto on cuda, torch on cpu"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (its compile is slow)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for overhead-<device>.json")
    args = parser.parse_args(argv)
    backend = args.backend or ("torch" if args.device == "cpu" else "auto")
    with fused_lora.set_backend(backend):
        print(f"host time per forward, M=1 K=64 N=64 r=8 fp32, {args.device}, backend {backend}")
        print(f"torch {torch.__version__}, best of 15 rounds of 500 calls each")
        results = per_call_us(rows(args.device, not args.no_compile), args.device)
        for name, us in results.items():
            print(f"  {name:52s} {us:8.1f} us")
    env = environment(torch.device(args.device))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"overhead-{device_slug(env)}.json"
    rows_ = [{"row": name, "host_us_per_call": us, "backend": backend} for name, us in results.items()]
    write_json(path, env, rows_, "python -m bench.overhead " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"wrote {path}")


RESULTS = pathlib.Path(__file__).parent / "results"


if __name__ == "__main__":
    main()
