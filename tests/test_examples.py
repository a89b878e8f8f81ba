"""The runnable demos in examples/ run and show what they claim."""

import importlib.util
import pathlib

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
