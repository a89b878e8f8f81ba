"""Benchmark cases: the shapes (named after real layers), the targets from
docs/benchmarks.md, and the roofline floor of each case."""

import dataclasses

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Case:
    m: int
    k: int
    n: int
    r: int
    dtype: str
    where: str = ""
    dropout: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.m}x{self.k}x{self.n} r{self.r} {self.dtype}" + (f" p{self.dropout:g}" if self.dropout else "")


# M x K x N of a 7-8B model (Llama-3-8B): decode and prefill of an attention
# projection, and the MLP up / down projections of a training step.
MODEL_SHAPES = [
    (1, 4096, 4096, "decode, attention projection"),
    (16, 4096, 4096, "decode batch, attention projection"),
    (4096, 4096, 4096, "prefill / training, attention projection"),
    (8192, 4096, 14336, "training, MLP up-projection"),
    (8192, 14336, 4096, "training, MLP down-projection"),
]


def gpu_preset():
    cases = [Case(m, k, n, r, "bf16", where) for r in (16, 64) for m, k, n, where in MODEL_SHAPES]
    cases += [Case(4096, 4096, 4096, r, "bf16", "large rank") for r in (128, 256)]
    cases += [Case(4096, 4096, 4096, 16, dtype, "other dtype") for dtype in ("fp16", "fp32")]
    cases += [Case(4096, 4096, 4096, 16, "bf16", "training with dropout", dropout=0.1)]
    return cases


def cpu_preset():
    cases = [Case(2048, size, size, 16, "fp32", "CPU preset") for size in (1024, 2048)]
    return [*cases, Case(2048, 1024, 1024, 16, "fp32", "CPU preset, dropout", dropout=0.1)]


def quick_preset(on_gpu: bool):
    """A smoke test (CI): every code path, tiny shapes, numbers mean nothing."""
    dtype = "bf16" if on_gpu else "fp32"
    return [
        Case(16, 256, 192, 16, dtype, "quick decode"),
        Case(512, 256, 384, 16, dtype, "quick prefill"),
        Case(512, 256, 384, 16, dtype, "quick dropout", dropout=0.1),
    ]


def custom(shapes: str, ranks: str, dtype: str):
    """--shapes 4096x4096x4096,16x4096x4096 --rank 16,64"""
    cases = []
    for shape in shapes.split(","):
        m, k, n = (int(v) for v in shape.lower().split("x"))
        cases += [Case(m, k, n, int(r), dtype, "custom") for r in ranks.split(",")]
    return cases


# ---- targets (docs/benchmarks.md), all on a GPU in bf16 unless said otherwise -


def targets(case: Case, pass_: str, on_gpu: bool) -> dict:
    """{figure: (comparison, bound)} for the ratios this case is judged on;
    figure names match the table's columns."""
    t = {}
    if case.dropout:  # the targets are for p = 0 (Unsloth's fast path needs it)
        return t
    if not on_gpu:
        if pass_ == "forward" and case.m >= 2048:
            t["fused/merged"] = ("<=", 1.08)
        return t
    if case.dtype != "bf16":
        return t
    if pass_ == "forward":
        if case.m >= 4096:
            bound = 1.05 if case.r <= 16 else 1.10 if case.r <= 64 else 1.15 if case.r <= 128 else None
            if bound:
                t["fused/merged"] = ("<=", bound)
        elif case.m <= 16:
            t["fused/merged"] = ("<=", 1.10)
            t["naive/fused"] = (">=", 1.50)
        if (case.m, case.k, case.n, case.r) == (4096, 4096, 4096, 16):
            t["naive/fused"] = (">=", 1.30)
            t["composed/fused"] = (">=", 1.10)
        t["triton-base/merged"] = ("<=", 1.05)
    else:
        t["fused/merged"] = ("<=", 1.10)
        if 4096 <= case.m <= 8192:
            t["naive/fused"] = (">=", 1.30)
        t["memory fused/merged"] = ("<=", 1.02)
    return t


def meets(ratio: float, target) -> bool:
    comparison, bound = target
    return ratio <= bound if comparison == "<=" else ratio >= bound


# ---- the floor: max(FLOPs / peak FLOP/s, minimal bytes / bandwidth) ----------

PEAK_BF16_FLOPS = 790e12  # an H100 measured 798 TFLOP/s on a bf16 8192^3 GEMM; H200 the same chip
BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}


def floor_ms(case: Case, pass_: str, device_name: str) -> float | None:
    """The time no implementation can beat, for 16-bit cases on an H100 / H200.

    forward: FLOPs 2M(NK + Kr + Nr), bytes of x, W, A, B, bias and y once.
    forward + backward adds dX = dY W + G A, dA, dB (2M(NK + 2Nr + 2Kr)
    FLOPs) and reads dY, W, x again and writes dX."""
    bandwidth = next((bw for key, bw in BANDWIDTH.items() if key in device_name), None)
    if bandwidth is None or case.dtype == "fp32":
        return None
    m, k, n, r = case.m, case.k, case.n, case.r
    flops = 2 * m * (n * k + k * r + n * r)
    elements = m * k + n * k + r * k + n * r + n + m * n
    if pass_ == "forward+backward":
        flops += 2 * m * (n * k + 2 * n * r + 2 * k * r)
        elements += m * n + n * k + 2 * m * k
    return max(flops / PEAK_BF16_FLOPS, 2 * elements / bandwidth) * 1e3
