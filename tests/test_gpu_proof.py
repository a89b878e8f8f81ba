"""python -m bench.gpu_proof: the dry run (the same steps on the CPU,
interpreted) writes a complete results file whose correctness rows all pass
and a table tuning.py reads; the budget skips steps; and the proof's own
machinery catches a wrong candidate and a forcing that did not take."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
from conftest import DEVICE

from bench import gpu_proof
from fused_lora.backends import candidates, tuning
from fused_lora.kernels.common import INTERPRETED

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not INTERPRETED, reason="the dry run is the interpreter's (a GPU runs the proof itself)"
)


def run_proof(out: pathlib.Path, *args: str, timeout: int) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "bench.gpu_proof", "--dry-run", "--out", str(out), *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done, json.loads((out / "gpu-proof-cpu-dry-run.json").read_text())


def read_table(path: pathlib.Path, monkeypatch) -> dict:
    """The table as tuning's own reader reads it (pointed at this file)."""
    monkeypatch.setattr(tuning, "TABLES", path.parent)
    monkeypatch.setattr(tuning, "_tables", {})
    monkeypatch.setattr(tuning, "device_slug", lambda device: path.stem)
    return tuning._table(torch.device(DEVICE))


def test_dry_run_proves_every_step(tmp_path, monkeypatch):
    done, proof = run_proof(tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    env = proof["environment"]
    assert env["dry_run"] and "means nothing" in env["note"]
    assert {"device", "torch", "triton", "git_commit", "date"} <= set(env)
    assert proof["command"].startswith("python -m bench.gpu_proof --dry-run")
    assert list(proof["steps"]) == list(gpu_proof.STEPS)
    for name, step in proof["steps"].items():
        assert step["status"] == "done", (name, step.get("traceback"))
        assert step["failed"] == [] and step["duration_s"] >= 0 and step["rows"], name
    assert all(job["status"] == "done" for job in proof["warm_up"]["jobs"]) and proof["warm_up"]["jobs"]

    correctness = proof["steps"]["correctness"]
    assert all(row["status"] == "done" and row["ok"] for row in correctness["rows"])
    assert all(check["ok"] for row in correctness["rows"] for check in row["checks"].values())
    covered = correctness["coverage"]
    pairs = {f"{x}/{a}" for x, a in gpu_proof.PAIRS} | {"fp32/fp32 tf32"}
    for kind, names in candidates.CANDIDATES.items():
        for name in names:  # every candidate ran, and passed every row it ran in
            assert any(key.startswith(f"{kind}/{name} ") for key in covered), f"{kind}/{name} never ran"
    for always in ("forward/fused", "forward/prepass", "grad_x/fused", "grad_x/prepass", "reduce/kernel"):
        assert {f"{always} {pair}" for pair in pairs} <= set(covered)
    assert all(entry["ok"] == entry["rows"] > 0 for entry in covered.values())
    assert any(row["adapters"] == "many" and max(row["dropout"]) > 0 for row in correctness["rows"])

    for row in proof["steps"]["headline"]["rows"]:
        for pass_ in ("forward", "forward+backward"):
            result = row["passes"][pass_]["result"]
            assert {"merged", "naive", "fused"} <= set(result)
            assert all(entry["check_ok"] and entry["median_ms"] > 0 for entry in result.values())
            assert row["passes"][pass_]["summary"]["ratios"]["fused/merged"] > 0
        assert row["passes"]["forward+backward"]["result"]["fused"]["peak_bytes"] >= 0
        assert row["candidates"] and all(
            c["check_ok"] and c["forward+backward"]["median_ms"] > 0 for c in row["candidates"]
        )
    labels = [row["case"]["label"] for row in proof["steps"]["headline"]["rows"]]
    assert any("fp32 adapters" in label for label in labels) and any("p0.1" in label for label in labels)

    multi = proof["steps"]["multi_adapter"]["rows"]
    assert {row["adapters"] for row in multi} == set(gpu_proof.plan(True).adapter_counts)
    assert all(row["ratios"]["loop/multi"] > 0 for row in multi)

    choices = proof["steps"]["choices"]
    assert all(row["fastest"] in row["eligible"] and row["default"] in row["eligible"] for row in choices["rows"])
    table_path = tmp_path / choices["table"]
    table = json.loads(table_path.read_text())
    assert set(table) == {"device", "triton", "source", "choices"} and table["source"] == proof["command"]
    assert table["choices"] == {row["key"]: row["fastest"] for row in choices["rows"]}
    assert read_table(table_path, monkeypatch) == table["choices"]
    for key, name in table["choices"].items():
        kind = key.split("|")[0]
        assert len(key.split("|")) == 10 and name in candidates.CANDIDATES[kind]
    assert {"forward", "grad_x", "reduce"} == {key.split("|")[0] for key in table["choices"]}


def test_a_budget_too_small_skips_every_step_and_still_writes(tmp_path):
    started = time.time()
    done, proof = run_proof(tmp_path, "--budget-s", "5", "--steps", "correctness,choices", timeout=300)
    assert done.returncode == 1 and "NOT PROVEN" in done.stdout
    assert list(proof["steps"]) == ["correctness", "choices"]
    for step in proof["steps"].values():
        assert step["status"] == "skipped" and "out of budget" in step["reason"]
    assert time.time() - started < 120  # no worker was started, nothing ran


def test_unknown_step_is_an_error():
    with pytest.raises(SystemExit):
        gpu_proof.parse_args(["--steps", "correctness,speed"])


def group(shape, multi=False, pair=("fp32", "fp32")):
    return gpu_proof.Group(pair, "ieee", shape, (16, 5, 9), multi, DEVICE, time.time() + 600)


def test_a_wrong_candidate_fails_its_rows_only(monkeypatch):
    """A candidate that adds a stray 1e-3 to y: the rows that forced it fail
    on y, the others pass."""
    forward_prepass = candidates.FORWARD["prepass"]

    def wrong(call):
        y, h = forward_prepass(call)
        return y.add_(1e-3), h

    monkeypatch.setitem(candidates.FORWARD, "prepass", wrong)
    rows = gpu_proof.run_group(group((33, 37, 29, 5)))
    bad = [row for row in rows if "prepass" in row["ran"]["forward"]]
    assert bad and all(not row["ok"] and not row["checks"]["y"]["ok"] for row in bad)
    assert all(row["ok"] for row in rows if row not in bad)


def test_a_forcing_that_does_not_take_fails_the_row():
    """tuning.use ignores an ineligible candidate (splitk at M = 33): the row
    says so instead of passing the default off as splitk."""
    problem = gpu_proof.Problem(33, 37, 29, (5,), "fp32", "fp32")
    t = gpu_proof.make_tensors(problem, DEVICE)
    ref = gpu_proof.layer_reference(problem, t, DEVICE)
    row, _ = gpu_proof.check_row(problem, t, ref, {"forward": "splitk"}, "ieee")
    assert all(check["ok"] for check in row["checks"].values())
    assert not row["ok"] and row["not_forced"]
    assert all(message.startswith("forward: forced splitk, ran ") for message in row["not_forced"])


def test_forced_sets_run_every_eligible_candidate():
    log = [gpu_proof.Choice(kind, "key", 1, names, names[0], None, None)
           for kind, names in [("forward", ["fused", "prepass", "splitk"]), ("grad_x", ["fused", "composed"]),
                               ("reduce", ["kernel", "composed"]), ("reduce", ["kernel", "composed"])]]  # fmt: skip
    sets = gpu_proof.forced_sets(log)
    assert len(sets) == 3
    for kind, names in [("forward", ["fused", "prepass", "splitk"]), ("grad_x", ["fused", "composed"])]:
        assert {s[kind] for s in sets} == set(names)


def test_recording_sees_every_choice_and_restores_choose():
    choose = tuning.choose
    problem = gpu_proof.Problem(7, 37, 29, (5, 3), "fp32", "fp32", multi=True, dropout=0.1)
    with pytest.raises(RuntimeError, match="stop"), gpu_proof.recording() as log:
        gpu_proof.run_layer(problem, gpu_proof.make_tensors(problem, DEVICE))
        raise RuntimeError("stop")
    assert tuning.choose is choose
    assert sorted(c.kind for c in log) == ["forward", "grad_x", "reduce", "reduce"]
    assert all(c.chosen in c.eligible and c.key.startswith(c.kind + "|") for c in log)
