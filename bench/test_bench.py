"""The benchmark as a pytest-benchmark suite:

    pytest bench/ --benchmark-only
    pytest bench/ --benchmark-only --benchmark-save=base   # then, after a change:
    pytest bench/ --benchmark-only --benchmark-compare

Same cases and implementations as `python -m bench` (the GPU preset on a GPU,
the CPU preset with the torch backend on a CPU). Each implementation is
checked against float64 before it is timed. pytest-benchmark times with a
wall clock, so on a GPU each call synchronizes; `python -m bench` (CUDA
events) is the source of the committed numbers.
"""

import pytest
import torch

import fused_lora
from bench import cases as presets
from bench import implementations as impl
from bench.runner import check, make_inputs, reference

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
CASES = presets.gpu_preset() if ON_GPU else presets.cpu_preset()


@pytest.fixture(autouse=True)
def _torch_backend_on_cpu():
    # Never time the interpreter: on a CPU `fused` is the torch backend.
    with fused_lora.set_backend("auto" if ON_GPU else "torch"):
        yield


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("name", list(impl.IMPLEMENTATIONS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_layer(benchmark, case, name, pass_):
    torch.manual_seed(0)
    p, (x,), grad_y = make_inputs(case, DEVICE)
    ok, worst = check(name, x, p, grad_y, reference(x, p, grad_y), presets.DTYPES[case.dtype])[pass_]
    assert ok, f"{name} fails the accuracy check ({worst:.2f} x the allowed error): not timed"
    benchmark.group = f"{case.label} {pass_}"
    if pass_ == "forward":

        def run():
            with torch.no_grad():
                impl.IMPLEMENTATIONS[name](x, p)
            _sync()
    else:

        def run():
            impl.forward_backward(name, x, p, grad_y)
            _sync()

    benchmark(run)
