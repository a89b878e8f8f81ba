"""Test setup: where the Triton kernels run, seeds, and shared fixtures.

Without a GPU the Triton kernels run in the interpreter. Triton reads
TRITON_INTERPRET when the kernels are decorated, so it is set here, before
anything imports fused_lora. FUSED_LORA_INTERPRETER_CONFIG=small|large picks
the default interpreter config; FUSED_LORA_BACKEND forces a backend for the
tests that do not choose one. On a GPU the kernels run the first config that
fits, as by default (FUSED_LORA_TUNE=1 would autotune instead).
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences Triton 3.9's warning

import pytest

import fused_lora
from fused_lora.kernels import configs
from fused_lora.kernels.common import INTERPRETED

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_report_header(config):
    mode = "interpreted on CPU" if INTERPRETED else f"compiled on {DEVICE}"
    fixed = " (autotuned)" if configs.TUNE else ""
    return f"fused-lora: Triton kernels {mode}{fixed}; torch backend on {DEVICE}"


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    """Run the test once per backend, forced with set_backend."""
    if request.param == "triton" and not (DEVICE == "cuda" or INTERPRETED):
        pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1")
    with fused_lora.set_backend(request.param):
        yield request.param


@pytest.fixture(params=["large", "small"] if INTERPRETED else ["autotuned"])
def config(request):
    """Run the test with each interpreter config ("small": 16^3 tiles, so
    every loop runs several iterations, every edge mask bites and the dA / dB
    reductions split over M); on a GPU, the autotuned (or fixed) configs."""
    if request.param == "autotuned":
        yield request.param
    else:
        with configs.use_interpreter_config(request.param):
            yield request.param


@pytest.fixture(autouse=True)
def _seed(request):
    # A fixed seed per test case, derived from its id: reproducible across
    # runs (crc32, unlike str hashes, is not randomised per process), and
    # different inputs for every case.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# Skips as markers: the reason shows in the report.
requires_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
requires_cpu = pytest.mark.skipif(DEVICE == "cuda", reason="CPU only")
interpreted_only = pytest.mark.skipif(not INTERPRETED, reason="the interpreter configs exist only without a GPU")
