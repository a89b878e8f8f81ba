"""python -m bench: time merged, naive, composed and fused LoRA layers.

    python -m bench                      # GPU: the bf16 preset; CPU: the fp32 CPU preset
    python -m bench --quick              # smoke test: tiny shapes, few repetitions
    python -m bench --shapes 4096x4096x4096,16x4096x4096 --rank 16,64 --dtype bf16

Prints one table (time per implementation, ratios to merged, naive/fused,
composed/fused, each with its target) and writes bench/results/<device>.json
(device, versions, git commit, date, every raw timing) and <device>.png.
"""

import argparse
import dataclasses
import pathlib
import sys
import time

import torch

import fused_lora
from fused_lora.kernels.common import INTERPRETED

from . import cases as presets
from .report import device_slug, environment, failed_checks, plot, summarize, table, write_json
from .runner import PASSES, run_case

RESULTS = pathlib.Path(__file__).parent / "results"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", help="comma-separated MxKxN, e.g. 4096x4096x4096,16x4096x4096")
    parser.add_argument("--rank", default="16", help="comma-separated ranks for --shapes (default 16)")
    parser.add_argument(
        "--dtype", choices=sorted(presets.DTYPES), help="dtype for --shapes (default: bf16 GPU, fp32 CPU)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions: a smoke test")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for the JSON and PNG")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if args.shapes:
        cases = presets.custom(args.shapes, args.rank, args.dtype or ("bf16" if on_gpu else "fp32"))
    elif args.quick:
        cases = presets.quick_preset(on_gpu)
    else:
        cases = presets.gpu_preset() if on_gpu else presets.cpu_preset()
    env = environment(device)
    if not on_gpu:
        # On a CPU `fused` is the torch backend, never the interpreter: an
        # interpreted kernel's time says nothing about the kernel.
        fused_lora.set_backend("torch")
        note = "CPU numbers: `fused` is the torch backend; the Triton kernels are not timed under the interpreter."
        if INTERPRETED:
            note += " (TRITON_INTERPRET=1 is set: ignored here.)"
        print(note)
        env["note"] = note
    print(f"{len(cases)} cases on {env['device']} (torch {env['torch']}, triton {env['triton']})")

    rows = []
    started = time.time()
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.label} ({case.where}) ... {time.time() - started:.0f}s", flush=True)
        result = run_case(case, device, quick=args.quick)
        for pass_ in PASSES:
            rows.append(
                {
                    "case": {**dataclasses.asdict(case), "label": case.label},
                    "pass": pass_,
                    "result": result[pass_],
                    "summary": summarize(case, pass_, result[pass_], env),
                }
            )
    print()
    print(table(rows, env))

    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("quick-" if args.quick else "") + device_slug(env)
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"
    write_json(json_path, env, rows, "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    plot(png_path, rows, env)
    print(f"\nwrote {json_path} and {png_path}")
    failed = failed_checks(rows, lambda row: row["case"]["label"])
    if failed:
        print("FAILED the accuracy check (not timed): " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
