"""Which candidate (`candidates.py`) computes a primitive, per (pass, M
bucket, N, K, rank, dtypes, adapters, dropout, bias):

1. `use(forward=..., grad_x=..., reduce=...)` (or FUSED_LORA_CANDIDATES=
   "forward=prepass,grad_x=fused") forces one where it is eligible: tests, the
   GPU proof;
2. under FUSED_LORA_TUNE=1 on a GPU, the first call of a key times every
   eligible candidate (a few milliseconds each, plus their first compile)
   and caches the fastest on disk (FUSED_LORA_CACHE_DIR, default
   ~/.cache/fused_lora), shared by later processes;
3. else the table shipped for this GPU (`fused_lora/tuned/<device>.json`,
   written by `python -m bench.gpu_proof` on that GPU), so a first call
   never stalls to tune;
4. else the heuristic below: a prediction from the compile report and a
   roofline model, not a measurement (bench/NOTES.md).
"""

import contextlib
import json
import os
import pathlib
import re

import torch

from ..kernels import configs
from ..kernels.common import INTERPRETED
from ..quantized import QuantizedWeight
from .candidates import CANDIDATES, DECODE_ROWS, eligible

TABLES = pathlib.Path(__file__).resolve().parents[1] / "tuned"
_forced: dict[str, str] = {}
_tables: dict[str, dict] = {}
_cache: dict[str, str] | None = None


def _parse_forced(text: str) -> dict[str, str]:
    forced = {}
    for item in filter(None, text.split(",")):
        kind, _, name = item.partition("=")
        if kind not in CANDIDATES or name not in CANDIDATES[kind]:
            raise ValueError(f"FUSED_LORA_CANDIDATES: {item!r} is not <pass>=<candidate> of {list(CANDIDATES)}")
        forced[kind] = name
    return forced


@contextlib.contextmanager
def use(**choices: str):
    """Force candidates in a block, e.g. use(forward="prepass", reduce="kernel")."""
    global _forced
    _parse_forced(",".join(f"{k}={v}" for k, v in choices.items()))
    previous, _forced = _forced, {**_forced, **choices}
    try:
        yield
    finally:
        _forced = previous


def device_slug(device: torch.device) -> str:
    """The GPU as a file name, e.g. 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def key(kind: str, call, m: int) -> str:
    launch = call.launch
    return "|".join(
        str(v)
        for v in (
            kind,
            configs.m_bucket(m),
            call.weight.shape[0],
            call.weight.shape[1],
            configs.pad_rank(launch.width) if launch else 0,
            str(call.x.dtype).removeprefix("torch."),
            str(launch.dtype).removeprefix("torch.") if launch else "-",
            "multi" if call.rows is not None else "one",
            "dropout" if launch is not None and launch.has_dropout else "-",
            "bias" if call.bias is not None else "-",
        )
    )


def heuristic(kind: str, call, m: int, names: list[str]) -> str:
    """The default where neither a table nor tuning decides (predictions):
    decode splits K when W is large (every SM then reads a share of it); a
    large batch of one adapter without dropout goes to cuBLAS (the
    composition is the bar: about 1.1-1.17x merged weights at 4096^3, where
    the fused strategy (a) is predicted at 1.4x and the pre-pass with a
    pointer-based GEMM at about 1.2x); fp32 adapters, dropout and many
    adapters take the pre-pass from 256 rows (the mask and the fp32 shrink
    then cost once per element of x), and smaller batches the one-launch
    fused kernel; a quantized W stays with the kernels, which decode it in
    registers (the composition would decode it with torch ops first). Under
    the interpreter cuBLAS is never picked: the tests exercise the kernels."""
    if "splitk" in names and m <= DECODE_ROWS and call.weight.numel() >= 2**20:
        return "splitk"
    same_dtype = call.launch is not None and call.launch.dtype == call.x.dtype
    dense = not isinstance(call.weight, QuantizedWeight)  # a quantized W: decoded in the kernels, not by torch
    if "composed" in names and not INTERPRETED and same_dtype and (kind == "reduce" or (dense and m >= 256)):
        return "composed"
    if kind == "reduce":
        return "kernel"
    return "prepass" if m >= 256 and "prepass" in names else "fused"


def _table(device: torch.device) -> dict:
    slug = device_slug(device)
    if slug not in _tables:
        path = TABLES / f"{slug}.json"
        _tables[slug] = json.loads(path.read_text())["choices"] if path.is_file() else {}
    return _tables[slug]


def _cache_path(device: torch.device) -> pathlib.Path:
    root = os.environ.get("FUSED_LORA_CACHE_DIR") or pathlib.Path.home() / ".cache" / "fused_lora"
    return pathlib.Path(root) / f"choices-{device_slug(device)}.json"


def _tuned(kind: str, call, m: int, names: list[str], run) -> str:
    """The fastest eligible candidate for this key, timed once and cached on disk."""
    global _cache
    import triton.testing

    path = _cache_path(call.x.device)
    if _cache is None:
        _cache = json.loads(path.read_text()) if path.is_file() else {}
    name = _cache.get(key(kind, call, m))
    if name in names:
        return name
    times = {candidate: triton.testing.do_bench(lambda c=candidate: run(c), warmup=5, rep=25) for candidate in names}
    name = min(times, key=times.get)
    _cache[key(kind, call, m)] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**(json.loads(path.read_text()) if path.is_file() else {}), **_cache}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
    tmp.replace(path)  # atomic: another process reads the old file or the new one
    return name


def choose(kind: str, call, m: int, run) -> str:
    """The candidate of `kind` ("forward", "grad_x", "reduce") for this call;
    run(name) runs a candidate (for timing under FUSED_LORA_TUNE=1)."""
    names = eligible(kind, call, m)
    forced = _forced.get(kind) or _parse_forced(os.environ.get("FUSED_LORA_CANDIDATES", "")).get(kind)
    if forced in names:
        return forced
    if call.x.is_cuda:
        if configs.TUNE and len(names) > 1 and not torch.cuda.is_current_stream_capturing():
            return _tuned(kind, call, m, names, run)
        table_choice = _table(call.x.device).get(key(kind, call, m))
        if table_choice in names:
            return table_choice
    return heuristic(kind, call, m, names)
