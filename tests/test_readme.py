"""The README's usage example runs as written."""

import pathlib
import re

import torch

import fused_lora

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs():
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace = {}
    # As a user without a GPU runs it: on the torch backend, not interpreted.
    with fused_lora.set_backend("auto" if torch.cuda.is_available() else "torch"):
        exec(compile(example, "README.md", "exec"), namespace)
    layer = namespace["layer"]
    assert layer.lora_A.weight.grad is not None and layer.weight.grad is None
    assert namespace["y"].shape == (8, 128, 1024)
