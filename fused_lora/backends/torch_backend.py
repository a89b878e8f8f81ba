"""The primitives in plain torch, for CPU tensors (and any device where the
Triton kernels cannot run). Same interface as `triton_backend`.

The base GEMM writes y once and each adapter's update is added into it in
place (`addmm_`), so no M x N temporary exists when the adapters share x's
dtype; with fp32 adapters on bf16 / fp16 x the update is formed in fp32 and
added with one rounding, as PEFT does. Many adapters: a loop over the
adapters that have rows, each on its rows gathered by index (found on the
host: a device sync for ids on a GPU).

Dropout uses torch's own generator seeded with `seed` (not the kernels'
Philox stream), one uniform draw per element of x compared with each row's
adapter's p: the backward regenerates the same mask.
"""

import torch

from ..kernels.adapters import padded_rows
from ..quantized import QuantizedWeight


def _uniform(m, k, seed, device):
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand((m, k), generator=generator, device=device)


def dropout_mask(m, k, dropout_p, seed, device):
    """The (M, K) bool mask this backend uses for (seed, p): True = kept."""
    return _uniform(m, k, seed, device) >= dropout_p


def _each_adapter(adapters, rows):
    """(adapter index, its rows as an index tensor, or None for all rows) for
    every adapter that has rows."""
    if rows is None:
        yield 0, None
        return
    rows = rows.grouped(adapters.count)
    starts = rows.starts.tolist()
    for a in range(adapters.count):
        if starts[a + 1] > starts[a]:
            yield a, rows.order[starts[a] : starts[a + 1]].long()


def _take(t, idx):
    """t's rows idx (all rows for idx None; None stays None)."""
    return t if idx is None or t is None else t[idx]


def _lora_input(x, dropout_p, uniform, dtype):
    """d = dropout(x) in the adapters' dtype, the mask from `uniform`."""
    d = x.to(dtype)
    return d * _dropout_factors(uniform, dropout_p, dtype) if dropout_p > 0 else d


def _dropout_factors(uniform, dropout_p, dtype):
    return (uniform >= dropout_p).to(dtype).mul_(1.0 / (1.0 - dropout_p))


def _add_rows_(out, idx, left, right, alpha=None):
    """out[idx] += alpha * left @ right (all rows for idx None; alpha a 0-d
    tensor or None for 1), rounded once to out's dtype."""
    if right.dtype == out.dtype:
        block = _take(out, idx).addmm_(left if alpha is None else left * alpha, right)
        if idx is not None:
            out[idx] = block
    else:
        product = torch.mm(left, right)
        _add_into_(out, idx, product if alpha is None else product.mul_(alpha))


def _add_into_(out, idx, value):
    """out[idx] += value, rounded once to out's dtype."""
    if idx is None:
        out.add_(value)
    else:
        out[idx] = out[idx].add_(value)


def _skinny(m, adapters, like):
    """H or G, zeros, laid out as the Triton backend lays them out (and the
    custom ops' fakes describe): rows 16-byte aligned."""
    dtype = adapters.lora_a[0].dtype if adapters.count else like.dtype
    return padded_rows(m, adapters.width, dtype, like.device).zero_()


def dense(weight) -> torch.Tensor:
    """W as a tensor: a quantized base is decoded into a temporary (never
    kept between calls)."""
    return weight.dequantize() if isinstance(weight, QuantizedWeight) else weight


def _scaling(scalings):
    """One adapter's scaling as addmm_'s alpha: a float for a CPU tensor
    (reading it costs no sync), else the tensor itself."""
    return scalings.item() if scalings.device.type == "cpu" else scalings[0]


def _skinny_layout(h):
    """H or G (contiguous from a GEMM) in the layout of _skinny."""
    if (h.stride(0) * h.element_size()) % 16 == 0 or h.shape[0] <= 1:
        return h
    return padded_rows(*h.shape, h.dtype, h.device).copy_(h)


def _forward_one(x, weight, bias, lora_a, lora_b, scaling):
    """One adapter, no dropout, no DoRA: the common case on its shortest path."""
    y = torch.nn.functional.linear(x, weight, bias)
    h = torch.nn.functional.linear(x if x.dtype == lora_a.dtype else x.to(lora_a.dtype), lora_a)
    if lora_b.dtype == y.dtype and isinstance(scaling, float):
        y.addmm_(h, lora_b.t(), alpha=scaling)
    else:
        y.add_(torch.mm(h, lora_b.t()).mul_(scaling))
    return y, _skinny_layout(h)


def autograd_forward(x, weight, bias, lora_a, lora_b, scalings):
    """One adapter, no dropout, no DoRA, gradients wanted: _forward_one's ops
    recorded by torch's autograd (the same math as the backward formula,
    without a Python autograd Function's host time per step)."""
    return _forward_one(x, weight, bias, lora_a, lora_b, _scaling(scalings))[0]


def forward(x, weight, bias, adapters, rows, seed=0, *, column_scale=None, keep_z=False):
    """y = x W^T + bias + s_a H B_a^T and H = d A_a^T per row, d = dropout(x);
    with DoRA's column scale c: y = c * z + bias, z the same without bias.
    x: (M, K) -> (y: (M, N), H: (M, width)), and z: (M, N) when keep_z."""
    weight = dense(weight)
    scaled = column_scale is not None
    if not scaled and _one_plain(adapters, rows):
        return _forward_one(x, weight, bias, adapters.lora_a[0], adapters.lora_b[0], _scaling(adapters.scalings))
    y = torch.mm(x, weight.t()) if bias is None or scaled else torch.addmm(bias, x, weight.t())
    h = _skinny(x.shape[0], adapters, x)
    uniform = _uniform(*x.shape, seed, x.device) if adapters.has_dropout else None
    for a, idx in _each_adapter(adapters, rows):
        lora_a, lora_b = adapters.lora_a[a], adapters.lora_b[a]
        d = _lora_input(_take(x, idx), adapters.dropout_p[a], _take(uniform, idx), lora_a.dtype)
        h_a = torch.mm(d, lora_a.t())
        h[slice(None) if idx is None else idx, : lora_a.shape[0]] = h_a
        _add_rows_(y, idx, h_a, lora_b.t(), adapters.scalings[a])
    if scaled:
        z, y = y, y * column_scale.to(y.dtype)
        if bias is not None:
            y += bias
        return (y, h, z) if keep_z else (y, h)
    return y, h


def grad_x(grad_y, weight, adapters, rows, seed=0, *, compute_dx=True):
    """G = s_a dY B_a per row (M, width), and dX = dY W + mask / (1 - p) * G A_a
    (M, K) when compute_dx."""
    if _one_plain(adapters, rows):  # the common case's shortest path
        lora_a, lora_b = adapters.lora_a[0], adapters.lora_b[0]
        dy = grad_y if grad_y.dtype == lora_b.dtype else grad_y.to(lora_b.dtype)
        g = torch.mm(dy, lora_b).mul_(_scaling(adapters.scalings))
        if not compute_dx:
            return None, _skinny_layout(g)
        dx = torch.mm(grad_y, dense(weight))
        if lora_a.dtype == dx.dtype:
            dx.addmm_(g, lora_a)
        else:
            dx.add_(torch.mm(g, lora_a))
        return dx, _skinny_layout(g)
    g = _skinny(grad_y.shape[0], adapters, grad_y)
    dx = torch.mm(grad_y, dense(weight)) if compute_dx else None
    uniform = _uniform(grad_y.shape[0], weight.shape[1], seed, grad_y.device) if adapters.has_dropout else None
    for a, idx in _each_adapter(adapters, rows):
        lora_a, lora_b, p = adapters.lora_a[a], adapters.lora_b[a], adapters.dropout_p[a]
        g_a = torch.mm(_take(grad_y, idx).to(lora_b.dtype), lora_b).mul_(adapters.scalings[a])
        g[slice(None) if idx is None else idx, : lora_a.shape[0]] = g_a
        if not compute_dx:
            continue
        if p > 0:
            _add_into_(dx, idx, torch.mm(g_a, lora_a).mul_(_dropout_factors(_take(uniform, idx), p, g_a.dtype)))
        else:
            _add_rows_(dx, idx, g_a, lora_a)
    return dx, g


def _one_plain(adapters, rows) -> bool:
    """One adapter without dropout: the shortest paths apply."""
    return rows is None and adapters.count == 1 and adapters.dropout_p[0] == 0


def grad_a(x, g, adapters, rows, seed=0):
    """dA_a = G_a^T d_a: (r_a, K) per adapter, d = dropout(x), zeros for an
    adapter without rows."""
    if _one_plain(adapters, rows):
        return [torch.mm(g.t(), x if x.dtype == g.dtype else x.to(g.dtype))]
    grads = [torch.zeros_like(a) for a in adapters.lora_a]
    uniform = _uniform(*x.shape, seed, x.device) if adapters.has_dropout else None
    for a, idx in _each_adapter(adapters, rows):
        r = adapters.lora_a[a].shape[0]
        d = _lora_input(_take(x, idx), adapters.dropout_p[a], _take(uniform, idx), g.dtype)
        grads[a] = torch.mm(_take(g, idx)[:, :r].t(), d)
    return grads


def grad_b(grad_y, h, adapters, rows):
    """dB_a = s_a dY_a^T H_a: (N, r_a) per adapter, zeros for one without rows."""
    if _one_plain(adapters, rows):
        dy = grad_y if grad_y.dtype == h.dtype else grad_y.to(h.dtype)
        return [torch.mm(dy.t(), h).mul_(_scaling(adapters.scalings))]
    grads = [torch.zeros_like(b) for b in adapters.lora_b]
    for a, idx in _each_adapter(adapters, rows):
        r = adapters.lora_b[a].shape[1]
        dy = _take(grad_y, idx).to(h.dtype)
        grads[a] = torch.mm(dy.t(), _take(h, idx)[:, :r]).mul_(adapters.scalings[a])
    return grads
