from setuptools import find_packages, setup

setup(
    name="fused-lora",
    version="0.1.0",
    description="Triton kernels for LoRA linear layers: fused forward and backward, trainable and swappable",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fused_lora*"]),
    # The pruning's limits (read off the compile report) and the tuned tables a GPU writes.
    package_data={"fused_lora": ["kernels/*.json", "tuned/*.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6", "numpy", "safetensors"],
    extras_require={
        "test": [
            "pytest",
            "pytest-benchmark",
            "ruff==0.17.6",
            "peft",
            "transformers",
            "scikit-learn",
            "bitsandbytes==0.50.2",
        ],
        "interop": ["peft", "transformers"],
        # QLoRA / FP8 bases: bitsandbytes' Linear4bit, transformers' FP8Linear (quantize_base needs neither)
        "quant": ["bitsandbytes>=0.50", "transformers"],
        "examples": ["scikit-learn"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    license="Apache-2.0",
)
