"""fused_lora.hotswap_adapter and prepare_for_hotswap: adapters of other ranks
and alphas swapped into a compiled model in place, without recompiling
(torch._dynamo.config.error_on_recompile), each giving the outputs of a fresh
model loaded with that adapter, on both backends; PEFT's files; PEFT's rules
(layers the new adapter lacks are zeroed; new layers, another lora_dropout or
use_rslora raise); what padding means for r, training and save_adapter."""

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hot-swap tests use a tiny transformers Llama")

from conftest import DEVICE  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import (  # noqa: E402
    _torch_backend_unless_parametrized,  # noqa: F401 (an autouse fixture)
    assert_same_logits,
    logits,
    randomize_adapters,
    tiny_llama,
    token_ids,
)
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from fused_lora import (  # noqa: E402
    apply_lora,
    hotswap_adapter,
    load_adapter,
    prepare_for_hotswap,
    save_adapter,
)
from fused_lora.integrations.model import lora_layers  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def write_adapter(base, path, r, lora_alpha, targets=TARGETS, **kwargs):
    """A trained-looking adapter (random A, B) saved with save_adapter; returns the path."""
    model = apply_lora(copy.deepcopy(base), targets, r=r, lora_alpha=lora_alpha, **kwargs)
    randomize_adapters(model)
    save_adapter(model, path)
    return path


def fresh_logits(base, path, ids):
    """What a model freshly loaded with the adapter computes (eager)."""
    return logits(load_adapter(copy.deepcopy(base), path), ids)


def layer_states(model):
    return {name: copy.deepcopy(layer.state_dict()) for name, layer in lora_layers(model).items()}


def assert_unchanged(model, states):
    for name, layer in lora_layers(model).items():
        for key, value in layer.state_dict().items():
            assert torch.equal(value, states[name][key]), f"{name}.{key} changed"


@pytest.mark.parametrize("prepared", [False, True], ids=["unprepared", "max_rank=8"])
def test_swaps_in_a_compiled_model_without_recompiling(backend, base, tmp_path, prepared):
    """Ranks 4 -> 4 (another alpha) -> 2 need no preparation; 8 needs prepare_for_hotswap(max_rank=8)
    before compiling, and without it is refused, changing nothing."""
    adapters = [(4, 8), (4, 3), (2, 5), (8, 16)]
    paths = [write_adapter(base, tmp_path / f"r{r}-alpha{alpha}", r, alpha) for r, alpha in adapters]
    model = load_adapter(copy.deepcopy(base), paths[0])
    if prepared:
        prepare_for_hotswap(model, max_rank=8)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    ids = token_ids()
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert_same_logits(logits(compiled, ids), fresh_logits(base, paths[0], ids), torch.float32)
        for path, (r, alpha) in zip(paths[1:] if prepared else paths[1:3], adapters[1:], strict=False):
            assert hotswap_adapter(compiled, path) is compiled
            assert (q_proj.r, q_proj.lora_alpha, q_proj.scaling) == (r, alpha, alpha / r)
            assert_same_logits(logits(compiled, ids), fresh_logits(base, path, ids), torch.float32)
        if not prepared:
            states = layer_states(model)
            with pytest.raises(ValueError, match=r"rank 8, its tensors hold rank 4: .*prepare_for_hotswap"):
                hotswap_adapter(compiled, paths[3])
            assert_unchanged(model, states)
            assert_same_logits(logits(compiled, ids), fresh_logits(base, paths[2], ids), torch.float32)
            # The control: new Parameters (what padding after compiling makes) do need a new graph.
            q_proj.pad_rank(8)
            with pytest.raises(torch._dynamo.exc.RecompileError):
                logits(compiled, ids)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_swaps_in_adapters_saved_by_peft(base, tmp_path):
    """PEFT's files, with rank and alpha patterns: the swapped model computes PEFT's outputs."""
    peft = pytest.importorskip("peft", reason="needs peft")
    model = load_adapter(copy.deepcopy(base), write_adapter(base, tmp_path / "first", 4, 8))
    prepare_for_hotswap(model, max_rank=6)
    ids = token_ids()
    for i, config in enumerate(
        [
            dict(r=2, lora_alpha=3, rank_pattern={"v_proj": 6}),
            dict(r=4, lora_alpha=8, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 1}),
        ]
    ):
        peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=TARGETS, **config))
        randomize_adapters(peft_model)
        peft_model.save_pretrained(tmp_path / f"peft{i}")
        hotswap_adapter(model, tmp_path / f"peft{i}")
        for name, layer in lora_layers(model).items():
            module = peft_model.get_base_model().get_submodule(name)
            assert (layer.r, layer.scaling) == (module.r["default"], module.scaling["default"])
        assert_same_logits(logits(model, ids), logits(peft_model, ids), torch.float32)


def test_layers_the_new_adapter_lacks_are_zeroed(base, tmp_path):
    model = load_adapter(copy.deepcopy(base), write_adapter(base, tmp_path / "both", 4, 8))
    q_only = write_adapter(base, tmp_path / "q", 4, 8, targets=["q_proj"])
    hotswap_adapter(model, q_only)
    for name, layer in lora_layers(model).items():
        assert layer.lora_A.weight.any() == layer.lora_B.weight.any() == name.endswith("q_proj")
    ids = token_ids()
    assert_same_logits(logits(model, ids), fresh_logits(base, q_only, ids), torch.float32)


def test_lora_bias_is_swapped_and_zeroed_where_the_file_has_none(base, tmp_path):
    model = load_adapter(copy.deepcopy(base), write_adapter(base, tmp_path / "b1", 4, 8, lora_bias=True))
    ids = token_ids()
    with_bias = write_adapter(base, tmp_path / "b2", 2, 3, lora_bias=True)
    hotswap_adapter(model, with_bias)
    assert_same_logits(logits(model, ids), fresh_logits(base, with_bias, ids), torch.float32)
    plain = write_adapter(base, tmp_path / "plain", 4, 8)
    hotswap_adapter(model, plain)  # as PEFT: a tensor the new adapter lacks is zeroed
    assert all(layer.lora_bias and not layer.lora_B.bias.any() for layer in lora_layers(model).values())
    assert_same_logits(logits(model, ids), fresh_logits(base, plain, ids), torch.float32)


def test_what_cannot_be_swapped_is_refused_before_any_change(base, tmp_path):
    model = load_adapter(copy.deepcopy(base), write_adapter(base, tmp_path / "first", 4, 8))
    states = layer_states(model)
    cases = [
        (dict(targets=["q_proj", "k_proj"]), ValueError, r"targets modules that have no LoRALinear layer: \[.*k_proj"),
        (dict(lora_dropout=0.1), ValueError, r"lora_dropout=0\.1, layer .* 0\.0: hot-swapping cannot change"),
        (dict(use_rslora=True), ValueError, "hot-swapping cannot change use_rslora"),
        (dict(lora_bias=True), ValueError, r"unexpected \[.*lora_B\.bias.*needs layers made with lora_bias=True"),
        (dict(init_lora_weights="pissa"), NotImplementedError, "hot-swapping PiSSA adapters is not supported"),
    ]
    for i, (kwargs, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            hotswap_adapter(model, write_adapter(base, tmp_path / str(i), 4, 8, **kwargs))
        assert_unchanged(model, states)
    ok = write_adapter(base, tmp_path / "ok", 2, 4)
    lora_layers(model)["model.layers.1.self_attn.v_proj"].merge()
    with pytest.raises(ValueError, match=r"layers \['model\.layers\.1\.self_attn\.v_proj'\] are merged"):
        hotswap_adapter(model, ok)
    with pytest.raises(ValueError, match="hotswap_adapter needs a model with LoRALinear layers"):
        hotswap_adapter(copy.deepcopy(base), ok)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        hotswap_adapter(model, tmp_path / "nowhere")


def test_prepare_for_hotswap_checks_and_refusals(base, tmp_path):
    model = load_adapter(copy.deepcopy(base), write_adapter(base, tmp_path / "first", 4, 8))
    states = layer_states(model)
    for max_rank, message in [(0, "max_rank must be a positive integer"), (3, r"max_rank=3 is smaller than .*: 4")]:
        with pytest.raises(ValueError, match=message):
            prepare_for_hotswap(model, max_rank=max_rank)
    assert_unchanged(model, states)
    with pytest.raises(ValueError, match=r"prepare_for_hotswap must run before torch\.compile"):
        prepare_for_hotswap(torch.compile(model, backend="aot_eager"), max_rank=8)
    model.compile(backend="aot_eager")  # compiled in place
    with pytest.raises(ValueError, match=r"prepare_for_hotswap must run before torch\.compile"):
        prepare_for_hotswap(model, max_rank=8)
    with pytest.raises(ValueError, match="prepare_for_hotswap needs a model with LoRALinear layers"):
        prepare_for_hotswap(copy.deepcopy(base), max_rank=8)


def test_a_padded_layer_keeps_its_outputs_trains_and_saves_its_real_rank(base, tmp_path):
    """After prepare_for_hotswap: r is the adapter's rank, max_rank the tensors'; the outputs are
    the same; gradients leave the zero padding zero; save_adapter writes rank r, which PEFT reads."""
    peft = pytest.importorskip("peft", reason="needs peft")
    model = load_adapter(copy.deepcopy(base), write_adapter(base, tmp_path / "first", 4, 8))
    ids = token_ids()
    before = logits(model, ids)
    prepare_for_hotswap(model, max_rank=8)
    layer = model.model.layers[0].self_attn.q_proj
    assert (layer.r, layer.max_rank, tuple(layer.lora_B.weight.shape)) == (4, 8, (64, 8))
    assert "max_rank=8" in repr(layer)
    assert_same_logits(logits(model, ids), before, torch.float32)

    model(ids).logits.float().pow(2).mean().backward()
    assert layer.lora_A.weight.grad[:4].abs().max() > 0 and layer.lora_B.weight.grad[:, :4].abs().max() > 0
    assert not layer.lora_A.weight.grad[4:].any() and not layer.lora_B.weight.grad[:, 4:].any()

    hotswap_adapter(model, write_adapter(base, tmp_path / "r2", 2, 4))
    save_adapter(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["r"] == 2
    tensors = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 64)
    from_file = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "saved")
    assert_same_logits(logits(from_file, ids), logits(model, ids), torch.float32)
    assert load_adapter(model, tmp_path / "saved") is model, "a padded model loads its own rank too"

    with torch.no_grad():
        layer.lora_A.weight[5] = 1.0
    with pytest.raises(ValueError, match=r"padded to rank 8 .* non-zero values past the adapter's rank r=2"):
        save_adapter(model, tmp_path / "bad")
    with pytest.raises(ValueError, match="padded to max_rank=8 for hot-swapping"):
        layer.reset_lora_parameters()
    assert layer.lora_A.weight.device.type == DEVICE
