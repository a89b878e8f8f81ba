"""Every kernel variant compiles for sm_80 and sm_90 (no GPU needed), fits in
shared memory, keeps its accumulators in registers, and uses Hopper's wgmma on
sm_90 (bench/compile_check.py).

An interpreted kernel cannot be compiled and Triton reads TRITON_INTERPRET at
import, so the compiles run in a process of their own with it unset."""

import json
import os
import subprocess
import sys

import pytest

from bench import compile_check


@pytest.fixture(scope="module")
def results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile_check", "--suite"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _label(r):
    return f"{r['kernel']} sm_{r['arch']} {r['dtype']}/{r['adapter_dtype']} r_pad={r['r_pad']} {r['config']}"


def test_every_kernel_dtype_and_arch_compiles(results):
    compiled = {(r["kernel"], r["arch"], r["dtype"], r["adapter_dtype"]) for r in results}
    expected = {
        (kernel, arch, compile_check.DTYPE_NAMES[x], compile_check.DTYPE_NAMES[a])
        for kernel in compile_check.VARIANTS
        for arch in (80, 90)
        for x, a in compile_check.DTYPE_PAIRS
    }
    assert compiled >= expected
    assert len(results) == len(list(compile_check.suite_cases()))


def test_shared_memory_fits(results):
    too_big = [_label(r) + f": {r['shared']} > {r['shared_limit']}" for r in results if r["shared"] > r["shared_limit"]]
    assert not too_big, "\n".join(too_big)


def test_no_register_spills(results):
    spilling = [_label(r) + f": {r['spill_bytes']} bytes" for r in results if r["spill_bytes"]]
    assert not spilling, "\n".join(spilling)


def test_hopper_mma_on_sm90(results):
    """Tiles of 64 rows or more should run on wgmma on sm_90 (16-row decode
    tiles cannot: a warpgroup MMA is 64 rows tall)."""
    missing = [
        _label(r)
        for r in results
        if r["arch"] == 90 and "BLOCK_M=16 " not in r["config"] and r["dtype"] != "fp32" and not r["wgmma"]
    ]
    assert not missing, "\n".join(missing)
