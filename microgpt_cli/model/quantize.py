"""int8 weights for decoding and scoring on CPU, through PyTorch's own quantization.

Each nn.Linear (the head included) becomes PyTorch's dynamic-quantized Linear: int8 weights with
one scale per output row, and activations quantized to int8 per call, so the matrix products run
in fbgemm's int8 kernels. On the 2-core development VM that made the GPT-2-vocabulary head 2.8x
faster at one token and 7x at eight; weight-only int8 kernels (torchao's Int8WeightOnlyConfig,
torch._weight_int8pack_mm) were slower there than fp32, so they are not used. The quality cost is
measured with `microgpt eval --quantize int8` (see the README).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in `model` by an int8 one, in place, for inference only. A head
    tied to the embedding gets its own int8 copy; the embedding stays fp32."""
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao, whose CPU path is not fast yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
