"""The runnable demos in examples/ run and show what they claim."""

import importlib.util
import pathlib
import re

import pytest
import torch

import fused_lora

pytest.importorskip("sklearn", reason="examples/digits.py needs scikit-learn: pip install -e '.[test]'")

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_learns_8_and_9_with_lora_only(capsys):
    digits = load_example("digits")
    # As `python examples/digits.py` runs without a GPU: the torch backend (not the
    # interpreter) on one thread; shorter training.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with fused_lora.set_backend("auto" if torch.cuda.is_available() else "torch"):
            results = digits.main(["--epochs", "20", "--lora-epochs", "25"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and "adapter on disk" in printed

    assert results["before"]["0-7"] > 0.9
    assert results["before"]["8-9"] < 0.05, "the base model has never seen an 8 or a 9"
    assert results["after"]["8-9"] > 0.8, "LoRA alone taught it 8 and 9"
    assert results["after"]["0-7"] > 0.85, "without forgetting 0-7"
    assert results["trainable"] < 0.15 * results["total"]
    assert 0 < results["adapter_bytes"] < results["base_bytes"]
    assert results["merged_plain"] and results["merged_same"]
    assert results["merged_difference"] < 1e-4


README = EXAMPLES.parent / "README.md"
PEFT_SECTION = "## Use with PEFT and real models"


@pytest.mark.skipif(PEFT_SECTION not in README.read_text(), reason=f"README.md has no {PEFT_SECTION!r} section yet")
def test_readme_peft_section_runs():
    pytest.importorskip("peft", reason="the README's PEFT section needs peft")
    section = README.read_text().split(PEFT_SECTION, 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))
    namespace = {}
    with fused_lora.set_backend("auto" if torch.cuda.is_available() else "torch"):
        exec(compile(code, "README.md", "exec"), namespace)
    assert not any(isinstance(m, fused_lora.LoRALinear) for m in namespace["merged"].modules())
    assert len(fused_lora.model.lora_layers(namespace["reloaded"])) == 4
    assert namespace["trainable"] < namespace["total"]
