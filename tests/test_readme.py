"""The README's code examples run as written (the PEFT ones: test_examples.py)."""

import pathlib
import re

import torch

import fused_lora

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def run_first_block(section: str) -> dict:
    """Execute the first python block under the README heading `section`."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    example = re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)
    namespace = {}
    # As a user without a GPU runs it: on the torch backend, not interpreted.
    with fused_lora.set_backend("auto" if torch.cuda.is_available() else "torch"):
        exec(compile(example, f"README.md ({section})", "exec"), namespace)
    return namespace


def test_usage_example_runs():
    namespace = run_first_block("Use")
    layer = namespace["layer"]
    assert layer.lora_A.weight.grad is not None and layer.weight.grad is None
    assert namespace["y"].shape == (8, 128, 1024)


def test_multi_adapter_example_runs():
    namespace = run_first_block("Many adapters in one batch")
    layer = namespace["layer"]
    assert namespace["y"].shape == (4, 128, 1024)
    assert all(layer.lora_B[name].weight.grad is not None for name in ("sql", "chat"))
