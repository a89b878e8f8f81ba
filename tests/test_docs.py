"""The code in README.md and docs/*.md runs as written: every ```python block
of a file, in order, in one namespace (a block whose info string says
"skip" is shown, not run: it needs what a test machine lacks)."""

import pathlib
import re

import pytest
import torch

import fused_lora

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def python_blocks(page: pathlib.Path) -> list[str]:
    return [code for info, code in BLOCK.findall(page.read_text()) if "skip" not in info]


def run_page(page: pathlib.Path) -> dict:
    namespace = {}
    # As a user without a GPU runs it: on the torch backend, not interpreted.
    with fused_lora.set_backend("auto" if torch.cuda.is_available() else "torch"):
        for i, code in enumerate(python_blocks(page)):
            exec(compile(code, f"{page.name} (python block {i + 1})", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_page_code_runs(page):
    text = page.read_text()
    if "from peft" in text:
        pytest.importorskip("peft", reason=f"{page.name}'s examples need peft")
    if "BitsAndBytesConfig" in text or "import bitsandbytes" in text:
        pytest.importorskip("bitsandbytes", reason=f"{page.name}'s examples need bitsandbytes")
    run_page(page)


def test_readme_example_trains_and_serves():
    namespace = run_page(ROOT / "README.md")
    layer, many = namespace["layer"], namespace["many"]
    assert layer.lora_A.weight.grad is not None and layer.weight.grad is None
    assert namespace["y"].shape == (8, 128, 1024) and many.adapter_names == ["sql", "chat"]


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_nothing_points_outside_the_repository():
    """The repository stands alone: no page refers to files outside it."""
    for page in PAGES:
        assert "../shared" not in page.read_text(), page.name
