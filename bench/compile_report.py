"""python -m bench.compile_report: what every candidate's kernels compile to, without a GPU.

    python -m bench.compile_report            # the plain calls' kept configs, the others' default config
    python -m bench.compile_report --quick    # the subset the test suite compiles
    python -m bench.compile_report --out bench/results/compile-report-triton3.6.json   # under another Triton
    python -m bench.compile_report --exclude REPORT...   # a report's problems into SPILLING

For sm_80 and sm_90 it compiles each candidate's kernels as the launchers
specialize them (bench/compile_check.py), and writes one row per scenario x
kernel launch x config: registers per thread, bytes spilled, shared memory
against the device's limit, whether Hopper's wgmma is used, and whether the
pruning keeps the config (`pruned`) and runs it by default (`default`). It
prints the default configs per candidate and architecture, and every kept
config that spills, overflows shared memory or timed out: there should be
none (a fix goes in the pruning, fused_lora/kernels/configs.py, whose
SPILLING, in config_limits.json, `--exclude` updates from reports). Compiles
are cached per Triton version (`cache_path`; `--fresh` ignores the cache).
16-row decode tiles cannot use wgmma (a warpgroup MMA is 64 rows tall).
"""

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys

from .report import environment

RESULTS = pathlib.Path(__file__).parent / "results"
# Row order in the file: stable across runs, so that a new report diffs against the old one.
ORDER = ("candidate", "scenario", "kernel", "arch", "dtype", "adapter_dtype", "precision", "r_pad", "config")


def cache_path() -> pathlib.Path:
    """Where compiles are cached, per Triton version (FUSED_LORA_CACHE_DIR,
    default ~/.cache/fused_lora, as the tuning cache)."""
    import triton

    root = os.environ.get("FUSED_LORA_CACHE_DIR") or pathlib.Path.home() / ".cache" / "fused_lora"
    return pathlib.Path(root) / f"compile-check-triton{triton.__version__}.jsonl"


def compile_rows(quick: bool, workers: int | None = None, cache: bool = True) -> list[dict]:
    """The compile check's rows, run in a child process: compiling needs
    TRITON_INTERPRET unset when Triton is imported."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns without it; fusion is its default
    command = [sys.executable, "-m", "bench.compile_check"] + (["--suite"] if quick else [])
    command += ["--workers", str(workers)] if workers else []
    command += ["--cache", str(cache_path())] if cache else []
    proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)  # progress on stderr
    if proc.returncode:
        raise SystemExit(f"bench.compile_check failed with exit code {proc.returncode}")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in ORDER))


def problems(rows: list[dict]) -> list[dict]:
    """Kept configs that spill, exceed the shared memory limit or time out."""
    return [
        r for r in rows if not r["pruned"] and (r["timed_out"] or r["spill_bytes"] or r["shared"] > r["shared_limit"])
    ]


def _label(r: dict) -> str:
    return (
        f"{r['scenario']}: {r['kernel']} sm_{r['arch']} {r['dtype']}/{r['adapter_dtype']} {r['precision']} "
        f"r_pad={r['r_pad']} {r['config']}"
    )


def _cell(r: dict) -> str:
    if r["timed_out"]:
        return "timed out"
    over = "!" if r["shared"] > r["shared_limit"] else ""
    return (
        f"{r['registers']:>3} regs {r['spill_bytes']:>6} B spilled {r['shared'] // 1024:>3}K{over} shared "
        f"{'wgmma' if r['wgmma'] else 'mma'}"
    )


def render(rows: list[dict]) -> str:
    """Defaults per candidate, kernel and architecture (worst of their
    dtype pairs, precisions and ranks), then every problem."""
    worst = collections.defaultdict(list)
    for r in rows:
        if r["default"]:
            worst[(r["candidate"], r["kernel"], r["arch"])].append(r)
    lines = ["default configs, the one with most registers per candidate / kernel / arch:"]
    for (candidate, kernel, arch), group in sorted(worst.items()):
        r = max(group, key=lambda r: (r["timed_out"], r["spill_bytes"] or 0, r["registers"] or 0))
        spilling = sum(1 for g in group if g["spill_bytes"])
        lines.append(
            f"  {candidate:<16} {kernel:<22} sm_{arch}  {_cell(r)}  ({len(group)} cases, {spilling} spill; "
            f"worst {r['dtype']}/{r['adapter_dtype']} {r['precision']} r_pad={r['r_pad']} {r['config']})"
        )
    bad = problems(rows)
    lines.append(f"\n{len(rows)} rows, {sum(not r['pruned'] for r in rows)} kept; {len(bad)} kept with a problem:")
    lines += [f"  {_label(r)}: {_cell(r)}" for r in bad]
    pruned = [r for r in rows if r["pruned"]]
    spilling = sum(1 for r in pruned if r["timed_out"] or r["spill_bytes"] or r["shared"] > r["shared_limit"])
    lines.append(f"{len(pruned)} pruned rows, {spilling} of them spill, overflow or timed out")
    return "\n".join(lines)


KERNELS = {"lora_gemm_kernel": "gemm", "lora_shrink_kernel": "shrink", "lora_reduce_kernel": "reduce"}
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
FORMATS = {"NF4": "nf4", "NF4_NESTED": "nf4", "FP8": "fp8", "FP8_PER_TENSOR": "fp8"}


def _config(label: str):
    import triton

    fields = dict(item.split("=") for item in label.split())
    tile = {k: int(v) for k, v in fields.items() if k.startswith("BLOCK_") or k == "GROUP_M"}
    return triton.Config(tile, num_warps=int(fields["num_warps"]), num_stages=int(fields["num_stages"]))


def _class(r: dict) -> tuple:
    """(arch, regime, load) of a row, as fused_lora/kernels/configs.py names them."""
    import torch

    from fused_lora.kernels import configs

    flags = set(r["flags"].split())
    wide, adapter = (getattr(torch, DTYPES[r[k]]) for k in ("dtype", "adapter_dtype"))
    lora, _, base = r["precision"].partition(", base ")
    w_format = next((FORMATS[f] for f in flags if f in FORMATS), "")
    regime = configs.regime(wide, adapter, lora, base or None, w_format)
    return r["arch"], regime, configs.load("MULTI" in flags, "DROPOUT" in flags)


def exclusions(rows: list[dict], spilling: dict) -> dict:
    """SPILLING with what went wrong in the rows added: each kept config of
    the pruned kernels that spilled, overflowed shared memory or timed out is
    kept out of its class from its R_PAD on."""
    from fused_lora.kernels import configs

    merged = {kernel: {label: set(where) for label, where in labels.items()} for kernel, labels in spilling.items()}
    for r in problems(rows):
        if r["kernel"] in KERNELS:
            label = configs.config_label(_config(r["config"]))
            merged[KERNELS[r["kernel"]]].setdefault(label, set()).add((*_class(r), r["r_pad"]))
    for labels in merged.values():  # an entry from a smaller R_PAD on covers the larger
        for label, where in labels.items():
            labels[label] = {w for w in where if not any(v[:3] == w[:3] and v[3] < w[3] for v in where)}
    return merged


def write_spilling(spilling: dict, path: pathlib.Path) -> int:
    """SPILLING into the limits file (the budgets kept); returns its entries."""
    data = json.loads(path.read_text())
    data["SPILLING"] = {
        kernel: {label: sorted(list(w) for w in where) for label, where in sorted(labels.items())}
        for kernel, labels in spilling.items()
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    return sum(len(where) for labels in spilling.values() for where in labels.values())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the test suite's subset")
    parser.add_argument("--out", type=pathlib.Path, help="the JSON file (default: bench/results/compile-report.json)")
    parser.add_argument("--workers", type=int, help="compiling processes (default: one per CPU)")
    parser.add_argument("--fresh", action="store_true", help="compile everything again, ignoring the cache")
    parser.add_argument(
        "--exclude", nargs="+", type=pathlib.Path, metavar="REPORT",
        help="add what went wrong in these reports to SPILLING (fused_lora/kernels/config_limits.json)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.exclude:
        from fused_lora.kernels import configs

        rows = [row for path in args.exclude for row in json.loads(path.read_text())["rows"]]
        count = write_spilling(exclusions(rows, configs.SPILLING), configs.LIMITS_FILE)
        print(f"wrote {configs.LIMITS_FILE}: {count} classes kept out")
        return
    import torch

    rows = compile_rows(args.quick, args.workers, cache=not args.fresh)
    print(render(rows))
    path = args.out or RESULTS / ("compile-report-quick.json" if args.quick else "compile-report.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cpu"))
    # One row per line: a file of thousands of rows stays readable and diffs line by line.
    body = ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows)
    path.write_text(f'{{"environment": {json.dumps(env)},\n"rows": [\n{body}\n]}}\n')
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
