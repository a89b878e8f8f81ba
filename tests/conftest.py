"""Test setup: where the Triton kernels run, seeds, and the backend fixture.

Without a GPU the Triton kernels run in the interpreter. Triton reads
TRITON_INTERPRET when the kernels are decorated, so it is set here, before
anything imports fused_lora.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences Triton 3.9's warning

import pytest

import fused_lora
from fused_lora.kernels.common import INTERPRETED

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_report_header(config):
    mode = "interpreted on CPU" if INTERPRETED else f"compiled on {DEVICE}"
    return f"fused-lora: Triton kernels {mode}; torch backend on {DEVICE}"


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    """Run the test once per backend, forced with set_backend."""
    with fused_lora.set_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed(request):
    # A fixed seed per test case, derived from its id: reproducible across
    # runs (crc32, unlike str hashes, is not randomised per process), and
    # different inputs for every case.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
