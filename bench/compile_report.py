"""python -m bench.compile_report: what each kernel compiles to, without a GPU.

    python -m bench.compile_report            # every kernel x arch x dtype pair x rank x pruned config
    python -m bench.compile_report --quick    # the subset the test suite compiles

For sm_80 and sm_90 it prints registers per thread, bytes spilled, shared
memory against the device's limit, and whether Hopper's wgmma is used, and
writes bench/results/compile-report.json. Reading it: a spill or a shared
memory overflow in a config the autotuner may pick is a bug in the pruning
(fused_lora/kernels/configs.py); a 64-row or taller tile without wgmma on
sm_90 runs on the older, slower MMA path.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

from .report import environment

RESULTS = pathlib.Path(__file__).parent / "results"


def compile_rows(quick: bool) -> list[dict]:
    # Compiling needs TRITON_INTERPRET unset when Triton is imported: a child process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    command = [sys.executable, "-m", "bench.compile_check"] + (["--suite"] if quick else [])
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return [json.loads(line) for line in proc.stdout.splitlines()]


def render(rows: list[dict]) -> str:
    header = (
        f"{'kernel':<8} {'arch':<6} {'dtypes':<10} {'r_pad':>5} {'regs':>5} {'spill':>6} {'shared':>15} wgmma  config"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        shared = f"{r['shared'] // 1024}K/{r['shared_limit'] // 1024}K" + (
            "!" if r["shared"] > r["shared_limit"] else ""
        )
        lines.append(
            f"{r['kernel']:<8} sm_{r['arch']:<3} {r['dtype'] + '/' + r['adapter_dtype']:<10} {r['r_pad']:>5} "
            f"{r['registers']:>5} {r['spill_bytes']:>6} {shared:>15} {'yes' if r['wgmma'] else 'no':<6} {r['config']}"
        )
    spilling = sum(1 for r in rows if r["spill_bytes"])
    too_big = sum(1 for r in rows if r["shared"] > r["shared_limit"])
    lines.append(f"\n{len(rows)} compiles: {spilling} spill registers, {too_big} exceed shared memory")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the test suite's subset")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    rows = compile_rows(args.quick)
    print(render(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("compile-report-quick.json" if args.quick else "compile-report.json")
    env = environment(torch.device("cpu"))
    path.write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
