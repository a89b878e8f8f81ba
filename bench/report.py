"""Turn runner results into ratios, a printed table, a JSON file and a plot."""

import datetime
import json
import pathlib
import platform
import re
import subprocess

import torch
import triton

from .cases import Case, floor_ms, meets, targets

IMPLS = ("merged", "naive", "composed", "fused")


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    """What a results file must record about where it was measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = bool(subprocess.run(status, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({_cpu_name()})",
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


def device_slug(env: dict) -> str:
    """The device as a file name: 'cpu', or e.g. 'nvidia-h100-80gb-hbm3'."""
    if env["device_type"] != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")


def failed_checks(rows: list[dict], label) -> list[str]:
    """'<label(row)> <pass> <implementation>' for every entry that failed its accuracy check."""
    return [
        f"{label(row)} {row['pass']} {name}"
        for row in rows
        for name, entry in row["result"].items()
        if not entry["check_ok"]
    ]


def ratios(pass_result: dict) -> dict:
    """x / merged for each implementation, naive / fused, composed / fused,
    and fused / merged peak memory; None where a time is missing."""
    t = {name: pass_result.get(name, {}).get("median_ms") for name in IMPLS}

    def div(a, b):
        return None if a is None or b is None else a / b

    out = {f"{name}/merged": div(t[name], t["merged"]) for name in IMPLS if name != "merged"}
    out["triton-base/merged"] = div(pass_result.get("triton-base", {}).get("median_ms"), t["merged"])
    out["naive/fused"] = div(t["naive"], t["fused"])
    out["composed/fused"] = div(t["composed"], t["fused"])
    memory = {name: pass_result.get(name, {}).get("peak_bytes") for name in ("fused", "merged")}
    if memory["merged"]:
        out["memory fused/merged"] = div(memory["fused"], memory["merged"])
    return out


def summarize(case: Case, pass_: str, pass_result: dict, env: dict) -> dict:
    on_gpu = env["device_type"] == "cuda"
    r = ratios(pass_result)
    goals = targets(case, pass_, on_gpu)
    verdicts = {fig: meets(r[fig], goal) for fig, goal in goals.items() if r.get(fig) is not None}
    return {
        "ratios": r,
        "targets": {fig: list(goal) for fig, goal in goals.items()},
        "met": verdicts,
        "floor_ms": floor_ms(case, pass_, env["device"]),
    }


def _fmt_ratio(value, goal):
    if value is None:
        return "-"
    text = f"{value:.2f}"
    if goal:
        text += f" ({goal[0]}{goal[1]:g} {'ok' if meets(value, goal) else 'MISS'})"
    return text


def table(rows: list[dict], env: dict) -> str:
    """The printed report: one line per case and pass."""
    header = (
        f"{'case':<28} {'pass':<6} "
        + " ".join(f"{name + ' ms':>12}" for name in IMPLS)
        + f" {'floor ms':>9}  {'fused/merged':<22} {'naive/fused':<22} {'composed/fused':<22} {'mem f/m':<16}"
        + f" {'base/merged':<16}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        s = row["summary"]
        times = []
        for name in IMPLS:
            entry = row["result"].get(name)
            if entry is None:
                times.append("n/a")
            else:
                times.append(f"{entry['median_ms']:.4f}" if entry["check_ok"] else "FAILED")
        floor = s["floor_ms"]
        goal = s["targets"]
        lines.append(
            f"{row['case']['label']:<28} {'fwd' if row['pass'] == 'forward' else 'f+b':<6} "
            + " ".join(f"{t:>12}" for t in times)
            + f" {'-' if floor is None else f'{floor:.4f}':>9}  "
            + f"{_fmt_ratio(s['ratios'].get('fused/merged'), goal.get('fused/merged')):<22} "
            + f"{_fmt_ratio(s['ratios'].get('naive/fused'), goal.get('naive/fused')):<22} "
            + f"{_fmt_ratio(s['ratios'].get('composed/fused'), goal.get('composed/fused')):<22} "
            + f"{_fmt_ratio(s['ratios'].get('memory fused/merged'), goal.get('memory fused/merged')):<16} "
            + f"{_fmt_ratio(s['ratios'].get('triton-base/merged'), goal.get('triton-base/merged')):<16}"
        )
    return "\n".join(lines)


def write_json(path: pathlib.Path, env: dict, rows: list[dict], command: str):
    path.write_text(json.dumps({"environment": env, "command": command, "rows": rows}, indent=1) + "\n")


def plot(path: pathlib.Path, rows: list[dict], env: dict):
    """Grouped bars of x / merged per case, one panel per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(rows)), 8), squeeze=False)
    for ax, pass_ in zip(axes[:, 0], ("forward", "forward+backward"), strict=True):
        subset = [row for row in rows if row["pass"] == pass_]
        labels = [row["case"]["label"] for row in subset]
        for i, name in enumerate(("naive", "composed", "fused")):
            values = [row["summary"]["ratios"].get(f"{name}/merged") or 0 for row in subset]
            ax.bar([j + (i - 1) * 0.27 for j in range(len(subset))], values, width=0.27, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(subset)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("time / merged (lower is better)")
        ax.set_title(f"{pass_} on {env['device']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
