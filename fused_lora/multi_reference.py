"""PEFT's per-adapter loop for a mixed batch: the baseline the benchmark
times and, in float64, the reference the tests compare with.

x: (..., K)   W: (N, K)   lora_a[a]: (r_a, K)   lora_b[a]: (N, r_a)
adapter_ids: x's leading shape or its first dimension, -1 = base only
"""

import torch
import torch.nn.functional as F


def peft_mixed_batch(x, weight, bias, lora_a, lora_b, scalings, adapter_ids):
    """PEFT's `LoraLayer._mixed_batch_forward`: the base layer on every row,
    then for each adapter in the batch (found on the host) its rows gathered,
    two GEMMs in the adapter's dtype, the result added back in x's dtype.
    Launches and time grow with the number of adapters."""
    k = x.shape[-1]
    if adapter_ids.dim() != 1:  # one id per row of a 1-D or N-D x: index rows
        result_shape = (*x.shape[:-1], weight.shape[0])
        x, adapter_ids = x.reshape(-1, k), adapter_ids.reshape(-1)
    else:
        result_shape = None
    result = F.linear(x, weight, bias)
    ids = adapter_ids.tolist()
    for adapter in sorted(set(ids) - {-1}):
        rows = [i for i, a in enumerate(ids) if a == adapter]
        sub_batch = x[rows].to(lora_a[adapter].dtype)
        update = F.linear(F.linear(sub_batch, lora_a[adapter]), lora_b[adapter]) * scalings[adapter]
        result[rows] += update.to(result.dtype)
    return result if result_shape is None else result.reshape(result_shape)


def multi_lora_reference(x, weight, bias, lora_a, lora_b, scalings, adapter_ids):
    """The per-adapter loop with every input upcast to float64 on the CPU.
    Differentiable: tests take the reference gradients by autograd."""

    def f64(t):
        return None if t is None else t.to(device="cpu", dtype=torch.float64)

    return peft_mixed_batch(
        f64(x), f64(weight), f64(bias), [f64(a) for a in lora_a], [f64(b) for b in lora_b], scalings, adapter_ids.cpu()
    )
