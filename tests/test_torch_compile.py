"""LoRALinear and MultiLoRALinear under the PyTorch compiler stack:
torch.compile(fullgraph=True) with no graph breaks, in training and
inference, dynamic in the token dimension and equal to eager; the backend
read when the forward is traced (a guard: set_backend recompiles) and
carried to the backward; dropout (per adapter too) under compile; autocast
as nn.Linear does it; CUDA graphs (GPU only).

Most compiled tests use the "aot_eager" backend: it runs Dynamo, the fakes and
AOTAutograd's traced forward and backward, everything but Inductor's codegen,
in a second instead of tens. One test runs Inductor itself."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, requires_cuda
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fused_lora
from fused_lora import LoRALinear, MultiLoRALinear
from fused_lora.backends import torch_backend, triton_backend
from fused_lora.kernels.common import INTERPRETED


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


class MultiModel(nn.Module):
    """Two MultiLoRALinear layers around a GELU, (..., 16) -> (..., 8), with
    adapters a, b, c of different ranks (B random), the same ids for both."""

    def __init__(self, bias=True, dtype=None, lora_dtype=None, dropout=(0.0, 0.0, 0.0)):
        super().__init__()
        self.first = MultiLoRALinear(16, 24, bias, DEVICE, dtype)
        self.second = MultiLoRALinear(24, 8, bias, DEVICE, dtype)
        for name, (r1, r2), p in zip("abc", ((4, 3), (2, 1), (5, 2)), dropout, strict=True):
            kwargs = dict(lora_dropout=p, init_lora_weights=False, lora_dtype=lora_dtype)
            self.first.add_adapter(name, r1, 2 * r1, **kwargs)
            self.second.add_adapter(name, r2, r2, **kwargs)

    def forward(self, x, adapter_ids):
        return self.second(F.gelu(self.first(x, adapter_ids)), adapter_ids)


def every_adapter(m):
    """(m,) CPU ids in random order with every adapter (a, b, c) and the base layer present (m >= 4)."""
    return torch.cat([torch.arange(-1, 3), torch.randint(-1, 3, (m - 4,))])[torch.randperm(m)]


def lora_grads(model):
    return [p.grad for name, p in model.named_parameters() if "lora_" in name]


def run_step(model, x, *args):
    """y and the gradients of x and of every LoRA parameter for loss = sum(y^2)."""
    x = x.detach().clone().requires_grad_()
    y = model(x, *args)
    y.float().square().sum().backward()
    return [y, x.grad, *lora_grads(model)]


def assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g is not None and w is not None, f"item {i}: a gradient is missing"
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


@pytest.mark.parametrize("mode", ["train-dropout", "train", "eval"])
@pytest.mark.parametrize("ids", ["row", "batch"])
def test_multi_zero_graph_breaks_with_cpu_adapter_ids(backend, mode, ids):
    """adapter_ids on the CPU, one per row or one per batch entry: checked
    and grouped inside the graph, no host read."""
    model = MultiModel(dropout=(0.1, 0.0, 0.3) if mode == "train-dropout" else (0.0,) * 3)
    model.train(mode != "eval")
    x = torch.randn(3, 5, 16, device=DEVICE)
    adapter_ids = every_adapter(15).reshape(3, 5) if ids == "row" else torch.tensor([2, -1, 0])
    graphs, breaks, reasons = graph_breaks(lambda x, i: model(x, i).square().sum(), x, adapter_ids)
    assert (graphs, breaks) == (1, 0), reasons


def test_multi_zero_graph_breaks_with_fp32_adapters_and_autocast(backend):
    model = MultiModel(dtype=torch.bfloat16, lora_dtype=torch.float32)
    x, adapter_ids = torch.randn(7, 16, device=DEVICE, dtype=torch.bfloat16), every_adapter(7)
    graphs, breaks, reasons = graph_breaks(lambda x, i: model(x, i).float().sum(), x, adapter_ids)
    assert (graphs, breaks) == (1, 0), reasons
    fp32_model = MultiModel()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        graphs, breaks, reasons = graph_breaks(lambda x, i: fp32_model(x, i).float().sum(), x.float(), adapter_ids)
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
        assert_all_close(run_step(compiled, x), run_step(model, x))


def test_compiled_inference_matches_eager(backend):
    model = make_model().eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 4, 16, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("case", CASES)
def test_multi_compiled_training_matches_eager(backend, case):
    model = MultiModel(**CASES[case])
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    dtype = model.first.weight.dtype
    for rows in (9, 21):  # either side of the 16 rows that eager mode sorts from
        x = torch.randn(rows, 16, device=DEVICE, dtype=dtype)
        adapter_ids = every_adapter(rows)
        for m in (model, compiled_model):
            m.zero_grad(set_to_none=True)
        assert_all_close(run_step(compiled, x, adapter_ids), run_step(model, x, adapter_ids))


def test_multi_compiled_inference_matches_eager(backend):
    model = MultiModel().eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 4, 16, device=DEVICE)
    adapter_ids = torch.tensor([1, -1, 2])
    with torch.no_grad():
        y = compiled(x, adapter_ids)
        torch.testing.assert_close(y, model(x, adapter_ids))
        torch.testing.assert_close(compiled(x, adapter_ids.to(DEVICE)), y)


def test_multi_compiled_adapter_without_rows_gets_a_zero_gradient(backend):
    """Eager mode gives an adapter without rows None; a compiled graph cannot
    read the ids on the host, so it gives zeros (documented)."""
    model = MultiModel()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(torch.randn(6, 16, device=DEVICE), torch.tensor([0, 2, -1, 0, 2, 2])).square().sum().backward()
    for layer in (model.first, model.second):
        for ab in (layer.lora_A, layer.lora_B):
            assert ab["b"].weight.grad is not None and not ab["b"].weight.grad.any()
            assert ab["a"].weight.grad.abs().sum() > 0 and ab["c"].weight.grad.abs().sum() > 0


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


def test_multi_dynamic_token_dimension_compiles_once(backend):
    """One graph for 5, 9, 17 and 33 rows, across the 16 rows below which
    eager mode leaves the rows unsorted (a compiled graph always sorts)."""
    model = MultiModel()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for seq in (5, 9, 17, 33):
        x, adapter_ids = torch.randn(seq, 16, device=DEVICE), every_adapter(seq)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(adapter_ids, 0)
        torch.testing.assert_close(compiled(x, adapter_ids), model(x, adapter_ids))
    assert counter.frame_count == 1
    for seq in (5, 9, 17, 33):  # ids per batch entry: one id per sequence of 3 rows
        x, adapter_ids = torch.randn(3, seq, 16, device=DEVICE), torch.tensor([2, 0, -1])
        torch._dynamo.mark_dynamic(x, 1)
        torch.testing.assert_close(compiled(x, adapter_ids), model(x, adapter_ids))
    assert counter.frame_count == 2


def test_setting_the_scaling_after_compiling_needs_no_recompile(backend):
    """The scaling is data the graph reads (a buffer filled in place): a new
    value shows in the compiled output at once, with no new graph."""
    model = make_model().eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(3, 16, device=DEVICE)
    with torch.no_grad():
        before = compiled(x)
        model[0].scaling = 0.3
        after = compiled(x)
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, model(x))
    assert counter.frame_count == 1


# ---- the backend: read when traced, carried to the backward --------------------


@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="the Triton backend needs a GPU or the interpreter")
@pytest.mark.parametrize("layer", ["LoRALinear", "MultiLoRALinear"])
def test_backend_is_read_when_traced_and_travels_to_the_backward(monkeypatch, layer):
    """The backend chosen by set_backend when the forward runs is guarded on:
    changing it recompiles, and the compiled forward and its backward both
    run it, the backward even outside the `with set_backend(...)` block."""
    calls = []
    for name, module in (("torch", torch_backend), ("triton", triton_backend)):
        for fn in ("forward", "grad_x", "autograd_forward"):
            if not hasattr(module, fn):
                continue
            original = getattr(module, fn)
            tag = (name, fn)
            monkeypatch.setattr(module, fn, lambda *a, _f=original, _t=tag, **k: calls.append(_t) or _f(*a, **k))
    model = make_model() if layer == "LoRALinear" else MultiModel()
    args = () if layer == "LoRALinear" else (every_adapter(6),)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    with fused_lora.set_backend("triton"):  # "auto" picks triton on a GPU and in the interpreter
        eager = [t.detach().clone() for t in run_step(model, x, *args)]
    calls.clear()
    model.zero_grad(set_to_none=True)
    with fused_lora.set_backend("torch"):  # eager mode: the backward too runs the forward's backend
        y = model(x, *args)
    y.square().sum().backward()
    if layer == "LoRALinear":  # one adapter, no dropout: torch's autograd records the torch backend's ops
        assert calls == [("torch", "autograd_forward")] * 2
    else:
        assert calls == [("torch", "forward")] * 2 + [("torch", "grad_x")] * 2
    frames = []
    for name in ("torch", "triton", "torch"):
        calls.clear()
        model.zero_grad(set_to_none=True)
        with fused_lora.set_backend(name):
            y = compiled(x, *args)
            assert calls == [(name, "forward")] * 2
        y.square().sum().backward()  # outside the block, where "auto" would pick triton
        assert calls == [(name, "forward")] * 2 + [(name, "grad_x")] * 2
        assert_all_close([y, *lora_grads(model)], [eager[0], *eager[2:]], rtol=1e-5, atol=1e-5)
        frames.append(counter.frame_count)
    assert frames == [1, 2, 2], "a new backend recompiles; going back reuses the first graph"


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
        model.eval()
        assert not torch.equal(want[0], model(x)), "the dropout must show"


def test_multi_compiled_per_adapter_dropout(backend):
    """Per-adapter dropout (one adapter without) under compile: the eager
    result for the same manual_seed, a fresh mask per call, and the rows of
    the adapter without dropout and of the base layer never change."""
    model = MultiModel(dropout=(0.5, 0.0, 0.25))
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x, adapter_ids = torch.randn(12, 16, device=DEVICE), every_adapter(12)
    torch.manual_seed(1)
    want = run_step(model, x, adapter_ids)
    torch.manual_seed(1)
    got = run_step(compiled, x, adapter_ids)
    assert_all_close(got, want)
    with torch.no_grad():
        first, second = compiled(x, adapter_ids), compiled(x, adapter_ids)
        model.eval()
        no_dropout = model(x, adapter_ids)
    fixed = (adapter_ids == -1) | (adapter_ids == 1)
    for dropped, rows in ((True, ~fixed), (False, fixed)):
        assert torch.equal(first[rows], second[rows]) != dropped, "a fresh seed per call on dropout rows only"
        assert torch.equal(first[rows], no_dropout[rows]) != dropped


# ---- autocast --------------------------------------------------------------------

# (layer dtype, adapter dtype or None for the layer's, x dtype)
AUTOCAST_CASES = {
    "fp32-layer": (torch.float32, None, torch.float32),
    "bf16-layer-fp32-adapters": (torch.bfloat16, torch.float32, torch.float32),
    "fp16-layer": (torch.float16, None, torch.float32),
    "fp64-layer": (torch.float64, None, torch.float64),  # autocast leaves float64 alone
}


def _autocast_cast(t, dtype):
    return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t


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
    assert torch.equal(y, expected)

    y.float().sum().backward()
    assert x.grad.dtype == x.dtype
    for p in (layer.lora_A.weight, layer.lora_B.weight):
        assert p.grad is not None and p.grad.dtype == p.dtype


@pytest.mark.parametrize("case", ["fp32-layer", "bf16-layer-fp32-adapters", "fp16-layer"])
def test_multi_autocast_casts_like_nn_linear(backend, case):
    dtype, lora_dtype, x_dtype = AUTOCAST_CASES[case]
    layer = MultiModel(dtype=dtype, lora_dtype=lora_dtype).first
    x = torch.randn(9, 16, device=DEVICE, dtype=x_dtype, requires_grad=True)
    adapter_ids = every_adapter(9)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer(x, adapter_ids)
        linear_y = F.linear(x, layer.weight, layer.bias)
    assert y.dtype == linear_y.dtype == torch.bfloat16
    names = layer.adapter_names
    lora_a = [layer.lora_A[n].weight for n in names]
    lora_b = [layer.lora_B[n].weight for n in names]
    if lora_a[0].dtype != torch.float32:  # fp32 adapters stay fp32, others are cast
        lora_a, lora_b = [a.bfloat16() for a in lora_a], [b.bfloat16() for b in lora_b]
    cast = [_autocast_cast(t, torch.bfloat16) for t in (x, layer.weight, layer.bias)]
    scalings = [layer.scaling[n] for n in names]
    assert torch.equal(y, fused_lora.multi_lora_linear(*cast, lora_a, lora_b, scalings, adapter_ids))
    y.float().sum().backward()
    assert x.grad.dtype == x.dtype
    for n in names:
        assert layer.lora_A[n].weight.grad.dtype == layer.lora_B[n].weight.grad.dtype == layer.lora_A[n].weight.dtype


def test_compiled_autocast_matches_eager(backend):
    model = make_model()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 16, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want, got = model(x), compiled(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


def test_multi_compiled_autocast_matches_eager(backend):
    model = MultiModel()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x, adapter_ids = torch.randn(2, 5, 16, device=DEVICE), torch.tensor([1, 2])
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want = run_step(model, x, adapter_ids)
        got = run_step(compiled, x, adapter_ids[:, None].expand(2, 5).contiguous())
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    assert_all_close(got[:2], want[:2])
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    for name, g, w in zip(names, got[2:], want[2:], strict=True):
        if ".a." in name:  # no row of adapter a: eager gives None, compiled zeros
            assert w is None and not g.any(), name
        else:
            torch.testing.assert_close(g, w, msg=name)


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
            assert torch.equal(static_y, model(x))


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
def test_multi_cuda_graph_inference():
    """New x and new adapter_ids copied into the static GPU buffers: each
    replay equals an eager call on them."""
    model = MultiModel(dtype=torch.bfloat16, lora_dtype=torch.float32).eval()
    static_x = torch.randn(24, 16, device="cuda", dtype=torch.bfloat16)
    static_ids = every_adapter(24).cuda()
    with torch.no_grad():
        _warm_up(lambda: model(static_x, static_ids))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x, static_ids)
        for _ in range(2):
            x, adapter_ids = torch.randn_like(static_x), every_adapter(24)
            static_x.copy_(x)
            static_ids.copy_(adapter_ids)
            graph.replay()
            assert torch.equal(static_y, model(x, adapter_ids.cuda()))


@requires_cuda
def test_multi_cuda_graph_training_step():
    """Forward and backward with adapter_ids already on the GPU captured
    whole (no host sync to read them): after replay with new x and ids the
    LoRA gradients equal an eager step's."""
    model = MultiModel(dtype=torch.bfloat16, lora_dtype=torch.float32)
    eager = copy.deepcopy(model)
    static_x = torch.randn(24, 16, device="cuda", dtype=torch.bfloat16)
    static_ids = every_adapter(24).cuda()

    def step():
        model.zero_grad(set_to_none=False)
        model(static_x, static_ids).float().square().sum().backward()

    _warm_up(step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x, adapter_ids = torch.randn_like(static_x), every_adapter(24)
    static_x.copy_(x)
    static_ids.copy_(adapter_ids)
    graph.replay()
    eager.zero_grad(set_to_none=True)
    eager(x, adapter_ids.cuda()).float().square().sum().backward()
    assert_all_close(lora_grads(model), lora_grads(eager), rtol=2e-2, atol=1e-3)


@requires_cuda
def test_multi_cuda_graph_capture_refuses_cpu_adapter_ids():
    model = MultiModel().eval()
    static_x = torch.randn(8, 16, device="cuda")
    cpu_ids = every_adapter(8)
    with torch.no_grad():
        _warm_up(lambda: model(static_x, cpu_ids))
        graph = torch.cuda.CUDAGraph()
        with (
            pytest.raises(ValueError, match="adapter_ids must be on the GPU during CUDA graph capture"),
            torch.cuda.graph(graph),
        ):
            model(static_x, cpu_ids)


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
