"""The PyTorch stack around LoRALinear: torch.compile(fullgraph=True) with no
graph breaks, in training and inference, dynamic in the token dimension and
equal to eager; the backend chosen when the graph runs, not when it is
traced; dropout under compile; autocast as nn.Linear does it; CUDA graphs
(GPU only).

Most compiled tests use the "aot_eager" backend: it runs Dynamo, the fakes and
AOTAutograd's traced forward and backward, everything but Inductor's codegen,
in a second instead of tens. One test runs Inductor itself."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fused_lora
from fused_lora import LoRALinear, torch_backend, triton_backend
from fused_lora.kernels.common import INTERPRETED

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # no compiled code or counters carried over from another test
    yield
    torch._dynamo.reset()


def make_model(bias=True, dtype=None, lora_dtype=None, dropout=0.0):
    """Two LoRA layers around a GELU: (..., 16) -> (..., 8). B is random (a
    fresh layer's B = 0 would hide the LoRA branch)."""
    kwargs = dict(device=DEVICE, dtype=dtype, lora_dtype=lora_dtype, lora_dropout=dropout, init_lora_weights=False)
    return nn.Sequential(LoRALinear(16, 24, bias, r=4, **kwargs), nn.GELU(), LoRALinear(24, 8, bias, r=3, **kwargs))


def lora_grads(model):
    return [p.grad for name, p in model.named_parameters() if "lora_" in name]


def run_step(model, x):
    """y and the gradients of x and of every LoRA parameter for loss = sum(y^2)."""
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.float().square().sum().backward()
    return [y, x.grad, *lora_grads(model)]


def assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype, f"item {i}: {g.dtype} != {w.dtype}"
        torch.testing.assert_close(g, w, **tol, msg=lambda m, i=i: f"item {i}: {m}")


# ---- graph breaks -------------------------------------------------------------


def graph_breaks(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_count, explanation.graph_break_count, explanation.break_reasons


def test_the_break_counter_sees_breaks():
    """What the tests below rely on: a host read (`.item()`, as a per-call
    seed drawn with int(torch.randint(...).item()) would be) is a break."""
    _, breaks, _ = graph_breaks(lambda x: x * torch.randint(0, 9, ()).item(), torch.ones(2))
    assert breaks >= 1


@pytest.mark.parametrize("mode", ["train-dropout", "train", "eval"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_zero_graph_breaks(backend, mode, bias):
    model = make_model(bias, dropout=0.1 if mode == "train-dropout" else 0.0)
    model.train(mode != "eval")
    x = torch.randn(2, 5, 16, device=DEVICE)
    graphs, breaks, reasons = graph_breaks(lambda x: model(x).square().sum(), x)
    assert (graphs, breaks) == (1, 0), reasons


def test_zero_graph_breaks_with_fp32_adapters_and_autocast(backend):
    model = make_model(dtype=torch.bfloat16, lora_dtype=torch.float32)
    x = torch.randn(7, 16, device=DEVICE, dtype=torch.bfloat16)
    graphs, breaks, reasons = graph_breaks(lambda x: model(x).float().sum(), x)
    assert (graphs, breaks) == (1, 0), reasons
    fp32_model = make_model()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        graphs, breaks, reasons = graph_breaks(lambda x: fp32_model(x).float().sum(), x.float())
    assert (graphs, breaks) == (1, 0), reasons


# ---- compiled == eager ----------------------------------------------------------

CASES = {
    "fp32": dict(),
    "fp32-nobias": dict(bias=False),
    "bf16-fp32-adapters": dict(dtype=torch.bfloat16, lora_dtype=torch.float32),
}


@pytest.mark.parametrize("case", CASES)
def test_compiled_training_matches_eager(backend, case):
    model = make_model(**CASES[case])
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    dtype = model[0].weight.dtype
    for seq in (5, 9):  # a second shape: the recompiled (dynamic) graph is checked too
        x = torch.randn(2, seq, 16, device=DEVICE, dtype=dtype)
        for m in (model, compiled_model):
            m.zero_grad(set_to_none=True)
        want = run_step(model, x)
        got = run_step(compiled, x)
        assert_all_close(got, want)


def test_compiled_inference_matches_eager(backend):
    model = make_model().eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 4, 16, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_inductor_training_matches_eager():
    """Inductor itself compiles the graph around the ops (the torch backend;
    on CPU the Triton one would be interpreted inside it just the same)."""
    with fused_lora.set_backend("torch"):
        model = make_model()
        compiled_model = copy.deepcopy(model)
        compiled = torch.compile(compiled_model, fullgraph=True)
        x = torch.randn(2, 6, 16, device=DEVICE)
        assert_all_close(run_step(compiled, x), run_step(model, x), rtol=1e-4, atol=1e-5)


def test_dynamic_token_dimension_compiles_once(backend):
    """One graph serves every sequence length >= 2; lengths 0 and 1 get a
    graph each (Dynamo specialises sizes 0 and 1) and work too."""
    model = make_model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for seq in (5, 9, 17, 33):
        x = torch.randn(2, seq, 16, device=DEVICE)
        torch._dynamo.mark_dynamic(x, 1)
        torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1
    for seq in (1, 0):  # decode (one token), and no tokens at all
        x = torch.randn(2, seq, 16, device=DEVICE)
        torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count <= 3


@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="the Triton backend needs a GPU or the interpreter")
def test_backend_is_chosen_when_the_graph_runs(monkeypatch):
    """The compiled graph holds fused_lora::lora_forward, not a backend:
    set_backend after compiling still decides, with no recompile."""
    calls = []
    for module in (torch_backend, triton_backend):
        original = module.forward
        monkeypatch.setattr(module, "forward", lambda *a, _f=original, _m=module, **k: calls.append(_m) or _f(*a, **k))
    model = make_model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(3, 16, device=DEVICE)
    for name, module in (("torch", torch_backend), ("triton", triton_backend), ("torch", torch_backend)):
        calls.clear()
        with fused_lora.set_backend(name):
            compiled(x)
        assert calls == [module, module], name
    assert counter.frame_count == 1


# ---- dropout under compile -----------------------------------------------------


def test_compiled_dropout_draws_a_seed_per_call(backend):
    """The seed is drawn inside the graph from torch's generator: each call
    gets a new mask, the backward uses the forward's, and with the same
    manual_seed compiled and eager agree (aot_eager replays torch's RNG)."""
    model = make_model(dropout=0.5)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 16, device=DEVICE)
    torch.manual_seed(1)
    want = run_step(model, x)
    torch.manual_seed(1)
    got = run_step(compiled, x)
    assert_all_close(got, want)
    with torch.no_grad():
        assert not torch.equal(compiled(x), compiled(x)), "a fresh seed per call"


# ---- autocast --------------------------------------------------------------------

# (layer dtype, adapter dtype or None for the layer's, x dtype)
AUTOCAST_CASES = {
    "fp32-layer": (torch.float32, None, torch.float32),
    "bf16-layer-fp32-adapters": (torch.bfloat16, torch.float32, torch.float32),
    "fp16-layer": (torch.float16, None, torch.float32),
    "fp64-layer": (torch.float64, None, torch.float64),  # autocast leaves float64 alone
}


def _autocast_cast(t, dtype):
    return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", AUTOCAST_CASES)
def test_autocast_casts_like_nn_linear(backend, case, autocast_dtype):
    """y's dtype is nn.Linear's under the same autocast; x, W, bias are cast
    to the autocast dtype, fp32 adapters stay fp32; the result is exactly
    lora_linear on inputs cast that way outside autocast (so autocast does
    not recast anything inside the op either); gradients land in each
    parameter's own dtype."""
    dtype, lora_dtype, x_dtype = AUTOCAST_CASES[case]
    if dtype == torch.float64 and backend == "triton" and not INTERPRETED:
        pytest.skip("float64 runs on the torch backend only on a GPU")
    layer = LoRALinear(16, 12, r=4, device=DEVICE, dtype=dtype, lora_dtype=lora_dtype, init_lora_weights=False)
    x = torch.randn(3, 5, 16, device=DEVICE, dtype=x_dtype, requires_grad=True)
    with torch.autocast(DEVICE, dtype=autocast_dtype):
        y = layer(x)
        linear_y = F.linear(x, layer.weight, layer.bias)
    assert y.dtype == linear_y.dtype

    a, b = layer.lora_A.weight, layer.lora_B.weight
    if a.dtype != torch.float32:
        a, b = _autocast_cast(a, autocast_dtype), _autocast_cast(b, autocast_dtype)
    cast = [_autocast_cast(t, autocast_dtype) for t in (x, layer.weight, layer.bias)]
    expected = fused_lora.lora_linear(*cast, a, b, layer.scaling)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)

    y.float().sum().backward()
    assert x.grad.dtype == x.dtype
    for p in (layer.lora_A.weight, layer.lora_B.weight):
        assert p.grad is not None and p.grad.dtype == p.dtype


def test_compiled_autocast_matches_eager(backend):
    model = make_model()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 16, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want, got = model(x), compiled(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


# ---- CUDA graphs (GPU only) ---------------------------------------------------------


def _warm_up(fn, n=3):
    """Run fn on a side stream before capture, as torch.cuda.graph requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(stream)


@requires_cuda
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, None), (torch.bfloat16, torch.float32)], ids=["bf16", "fp32A"])
def test_cuda_graph_inference(dtypes):
    model = make_model(dtype=dtypes[0], lora_dtype=dtypes[1]).eval()
    static_x = torch.randn(4, 16, device="cuda", dtype=dtypes[0])
    with torch.no_grad():
        _warm_up(lambda: model(static_x))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        for _ in range(2):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            torch.testing.assert_close(static_y, model(x), rtol=0, atol=0)


@requires_cuda
def test_cuda_graph_training_step():
    """Forward and backward captured whole: after replay with new inputs the
    LoRA gradients equal an eager step's."""
    model = make_model(dtype=torch.bfloat16, lora_dtype=torch.float32)
    eager = copy.deepcopy(model)
    static_x = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16)

    def step():
        model.zero_grad(set_to_none=False)
        model(static_x).float().square().sum().backward()

    _warm_up(step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x = torch.randn_like(static_x)
    static_x.copy_(x)
    graph.replay()
    eager.zero_grad(set_to_none=True)
    eager(x).float().square().sum().backward()
    assert_all_close(lora_grads(model), lora_grads(eager), rtol=2e-2, atol=1e-3)


@requires_cuda
def test_dropout_refuses_cuda_graph_capture():
    model = make_model(dropout=0.1)
    static_x = torch.randn(4, 16, device="cuda")
    _warm_up(lambda: model(static_x))
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"), torch.cuda.graph(graph):
        model(static_x)


@requires_cuda
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_inductor_reduce_overhead_on_gpu(training):
    """torch.compile with Inductor and its CUDA graphs around the Triton kernels."""
    model = make_model(dtype=torch.bfloat16, lora_dtype=torch.float32).train(training)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # cudagraph trees record on a later call
        x = torch.randn(2, 64, 16, device="cuda", dtype=torch.bfloat16)
        if training:
            for m in (model, compiled_model):
                m.zero_grad(set_to_none=True)
            assert_all_close(run_step(compiled, x), run_step(model, x), rtol=2e-2, atol=2e-2)
        else:
            with torch.no_grad():
                torch.testing.assert_close(compiled(x), model(x), rtol=2e-2, atol=2e-2)
