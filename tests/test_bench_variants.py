"""python -m bench.variants: the quick run writes a complete results file in
which every implementation passed its float64 check and was timed; the
fused rows pass on the Triton kernels too (what a GPU times); and the check
rejects a layer that computes something else."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE

import fused_lora
from bench import variants
from bench.runner import PASSES

ROOT = pathlib.Path(__file__).resolve().parents[1]
# peft-qlora needs peft and bitsandbytes, peft-dora peft: where they are installed they must run.
NEEDS = {"peft-qlora": ("peft", "bitsandbytes"), "peft-dora": ("peft",)}


def installed(name: str) -> bool:
    return all(importlib.util.find_spec(package) is not None for package in NEEDS.get(name, ()))


def test_quick_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # Two OpenMP threads on a loaded 2-core machine make tiny ops wait milliseconds for each other; the quick
    # run's numbers mean nothing anyway.
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "bench.variants", "--quick", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    paths = list(tmp_path.glob("quick-variants-*.json"))
    assert len(paths) == 1, paths
    data = json.loads(paths[0].read_text())

    env_ = data["environment"]
    assert {"device", "torch", "triton", "git_commit", "date", "packages"} <= set(env_)
    assert data["command"] == f"python -m bench.variants --quick --out {tmp_path}"
    cases = {case.label: case for case in variants.preset(DEVICE == "cuda", quick=True)}
    assert [(row["case"]["label"], row["pass"]) for row in data["rows"]] == [
        (label, pass_) for label in cases for pass_ in PASSES
    ]
    for row in data["rows"]:
        variant, m, n = row["case"]["variant"], row["case"]["m"], row["case"]["n"]
        where = f"{row['case']['label']} {row['pass']}"
        assert not set(row["result"]) & set(row["unavailable"]), where
        assert set(row["result"]) | set(row["unavailable"]) == set(variants.IMPLS[variant]), where
        for name in row["unavailable"]:
            assert not installed(name), f"{where}: {name} is installed but did not run: {row['unavailable'][name]}"
        for name, entry in row["result"].items():
            assert entry["check_ok"] and entry["worst_error_over_allowed"] <= 1, (where, name, entry)
            assert entry["median_ms"] > 0 and len(entry["samples_ms"]) >= 3, (where, name)
        if row["pass"] == "forward+backward":
            saved = {name: entry["saved_bytes"] for name, entry in row["result"].items()}
            merged = next(name for name in saved if name.startswith("merged"))
            assert saved[merged] == 0, saved  # x and the merged W are held, and nothing else is needed
            assert all(size > 0 for name, size in saved.items() if name != merged), saved
            if variant == "dora":  # z (M x N, bf16) is kept for the magnitude's gradient
                assert saved["fused"] >= 2 * m * n, saved
        summary = row["summary"]
        for top, bottom in variants.RATIOS[variant]:
            if top in row["result"] and bottom in row["result"]:
                expected = row["result"][top]["median_ms"] / row["result"][bottom]["median_ms"]
                assert summary["ratios"][f"{top}/{bottom}"] == pytest.approx(expected), where
                if row["pass"] == "forward+backward" and row["result"][bottom]["saved_bytes"]:
                    assert f"saved {top}/{bottom}" in summary["ratios"], where
        goals = variants.targets(cases[row["case"]["label"]], row["pass"], DEVICE == "cuda")
        assert summary["targets"] == {fig: list(goal) for fig, goal in goals.items()}, where
        assert set(summary["met"]) <= set(goals), where


def _case_inputs(variant, m=16, k=256, n=128, r=8):
    case = variants.Case(variant, m, k, n, r, "bf16")
    layer = variants.make_layer(case, torch.device(DEVICE))
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
    return case, layer, x, grad_y, variants.reference(layer, x, grad_y)


@pytest.mark.parametrize("variant", variants.VARIANTS)
def test_fused_rows_pass_on_the_triton_kernels(variant):
    """The benchmark's `fused` layers (bitsandbytes' nested NF4 statistics
    where it is installed) through the Triton kernels, as a GPU times them:
    y and every gradient within the gate."""
    case, layer, x, grad_y, ref = _case_inputs(variant)
    with fused_lora.set_backend("triton"):
        impls, _ = variants.implementations(case, layer)
        checked = variants.check(impls["fused"], x, grad_y, ref, torch.bfloat16)
    assert checked["forward"][0] and checked["forward+backward"][0], checked


def test_check_rejects_another_layer():
    """The gate catches a layer that is not the case's: the quantized case's
    reference is the decoded base, not the dense W that was quantized, and
    DoRA's is not plain LoRA."""
    _, layer, x, grad_y, ref = _case_inputs("nf4")
    dense = dataclasses.replace(layer, quantized=None)
    unquantized = variants.Impl(
        lambda t: fused_lora.lora_linear(t, dense.weight, layer.bias, layer.lora_a, layer.lora_b, variants.SCALING),
        [layer.lora_a, layer.lora_b],
        [],
    )
    with fused_lora.set_backend("torch"):
        assert not variants.check(unquantized, x, grad_y, ref, torch.bfloat16)["forward"][0]
    _, layer, x, grad_y, ref = _case_inputs("dora")
    lora = variants.Impl(
        lambda t: fused_lora.lora_linear(t, layer.weight, layer.bias, layer.lora_a, layer.lora_b, variants.SCALING),
        [layer.lora_a, layer.lora_b],
        [],
    )
    with fused_lora.set_backend("torch"):
        checked = variants.check(lora, x, grad_y, ref, torch.bfloat16)
    assert not checked["forward"][0] and not checked["forward+backward"][0]
