"""Frozen base weights kept quantized: NF4 (QLoRA, as bitsandbytes stores
it) and FP8 e4m3 (as transformers' fine-grained FP8 layers store it).

    W (N, K) in `dtype` (the dtype the layer computes in: x's)

    nf4   data     uint8 (ceil(N*K / 2),): two 4-bit codes per byte over the
                   flattened row-major W, the first element in the high nibble
          absmax   fp32 (ceil(N*K / blocksize),): element (n, k) belongs to block
                   (n * K + k) // blocksize (a block may span two rows when
                   K is not a multiple of it)
          code     fp32 (16,): the NF4 levels;  W = code[c] * absmax[block]
          nested   (bitsandbytes' compress_statistics): absmax itself stored as
                   uint8 codes into nested_code (256,), scaled per block of
                   nested_blocksize by nested_absmax, plus nested_offset
    fp8   data     float8_e4m3fn (N, K)
          scale    fp32 (ceil(N / 128), ceil(K / 128)) block scales, or 0-d:
                   W = data * scale[n // 128, k // 128] (transformers' weight_scale_inv)

The kernels decode W tile by tile in registers inside the GEMM's K loop: it
is never kept dense in memory. `dequantize()` is the same decode in torch:
the torch backend's path and the tests' reference.
"""

import dataclasses

import torch

# The 16 NF4 levels (QLoRA's normal-float data type, as bitsandbytes defines it).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
FP8_BLOCK = 128
FP8_MAX = 448.0  # the largest finite e4m3fn value
FORMATS = ("nf4", "fp8")


@dataclasses.dataclass
class QuantizedWeight:
    """A quantized frozen base weight W (N, K); see the module docstring."""

    format: str
    data: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    absmax: torch.Tensor | None = None
    code: torch.Tensor | None = None
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None  # 0-d fp32
    nested_blocksize: int = 256
    scale: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        """N * K: the elements of the weight it stands for."""
        return self.shape[0] * self.shape[1]

    @property
    def requires_grad(self) -> bool:
        """A quantized base is frozen: its tensors never take a gradient."""
        return False

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed data and its statistics."""
        parts = (self.data, self.absmax, self.code, self.nested_absmax, self.nested_code, self.scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def block_absmax(self) -> torch.Tensor:
        """NF4: each block's absmax in fp32 (decoding the nested statistics)."""
        if not self.nested:
            return self.absmax.float()
        scale = self.nested_absmax.float().repeat_interleave(self.nested_blocksize)[: self.absmax.numel()]
        return self.nested_code.float()[self.absmax.long()] * scale + self.nested_offset.float()

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (N, K) in `dtype` (default: the compute dtype), decoded in fp32
        and rounded once."""
        n, k = self.shape
        if self.format == "fp8":
            w = self.data.float()
            scale = self.scale.float()
            if scale.dim():
                scale = scale.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]
            return (w * scale).to(dtype or self.dtype)
        # A byte holds two codes, high nibble first: look both up at once in a 256 x 2 table.
        byte = torch.arange(256, device=self.data.device)
        code = self.code.float()
        pairs = torch.stack((code[byte >> 4], code[byte & 15]), dim=1)
        values = pairs.index_select(0, self.data.reshape(-1).int()).reshape(-1)
        absmax = self.block_absmax()
        short = absmax.numel() * self.blocksize - values.numel()
        if short > 0:  # the last block's padding, never read
            values = torch.cat((values, values.new_zeros(short)))
        # Each block of `blocksize` values times its absmax, broadcast (not repeated to N x K).
        blocks = values[: absmax.numel() * self.blocksize].view(-1, self.blocksize) * absmax[:, None]
        return blocks.reshape(-1)[: n * k].reshape(n, k).to(dtype or self.dtype)

    # ---- how the custom ops carry it: the data, a spec string and the other tensors

    def spec(self) -> str:
        """format:NxK:dtype[:blocksize[:nested_blocksize]]"""
        n, k = self.shape
        spec = f"{self.format}:{n}x{k}:{str(self.dtype).removeprefix('torch.')}"
        if self.format == "nf4":
            spec += f":{self.blocksize}" + (f":{self.nested_blocksize}" if self.nested else "")
        return spec

    def parts(self) -> list[torch.Tensor]:
        if self.format == "fp8":
            return [self.scale]
        nested = [self.nested_absmax, self.nested_code, self.nested_offset] if self.nested else []
        return [self.absmax, self.code, *nested]

    @staticmethod
    def shape_of(spec: str) -> tuple[int, int]:
        """(N, K) from a spec alone (the custom ops' fakes)."""
        n, k = spec.split(":")[1].split("x")
        return int(n), int(k)

    @classmethod
    def from_spec(cls, data: torch.Tensor, spec: str, parts: list[torch.Tensor]) -> "QuantizedWeight":
        fmt, shape, dtype, *blocks = spec.split(":")
        n, k = (int(v) for v in shape.split("x"))
        weight = cls(fmt, data, (n, k), getattr(torch, dtype))
        if fmt == "fp8":
            weight.scale = parts[0]
        else:
            weight.absmax, weight.code, weight.blocksize = parts[0], parts[1], int(blocks[0])
            if len(blocks) > 1:
                weight.nested_absmax, weight.nested_code, weight.nested_offset = parts[2:5]
                weight.nested_blocksize = int(blocks[1])
        return weight

    def to(self, device) -> "QuantizedWeight":
        """The same weight on another device."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return QuantizedWeight(**moved)


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> QuantizedWeight:
    """W (N, K) to NF4 in bitsandbytes' layout (no nested statistics): each
    block of `blocksize` flattened elements scaled by its absmax, every
    element rounded to the nearest NF4 level."""
    n, k = weight.shape
    flat = weight.detach().float().reshape(-1)
    blocks = -(-flat.numel() // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32, device=flat.device)
    padded[: flat.numel()] = flat
    absmax = padded.reshape(blocks, blocksize).abs().amax(1)
    normalized = padded.reshape(blocks, blocksize) / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    levels = torch.tensor(NF4_LEVELS, device=flat.device)
    codes = (normalized.reshape(-1, 1) - levels).abs().argmin(1)[: flat.numel()].to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat((codes, codes.new_zeros(1)))
    data = (codes[0::2] << 4) | codes[1::2]
    return QuantizedWeight("nf4", data, (n, k), weight.dtype, absmax=absmax, code=levels, blocksize=blocksize)


@torch.no_grad()
def quantize_fp8(weight: torch.Tensor) -> QuantizedWeight:
    """W (N, K) to FP8 e4m3 with one fp32 scale per 128 x 128 block (as
    transformers' fine-grained FP8 layers store it): scale = block absmax / 448."""
    n, k = weight.shape
    w = weight.detach().float()
    rows, cols = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
    padded = torch.zeros(rows * FP8_BLOCK, cols * FP8_BLOCK, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w
    amax = padded.reshape(rows, FP8_BLOCK, cols, FP8_BLOCK).abs().amax(dim=(1, 3))
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    full = scale.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]
    data = (w / full).to(torch.float8_e4m3fn)
    return QuantizedWeight("fp8", data, (n, k), weight.dtype, scale=scale)
