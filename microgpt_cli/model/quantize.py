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

import torch.nn as nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in `model` by an int8 one, in place, for inference only. A head
    tied to the embedding gets its own int8 copy; the embedding stays fp32. Layers are swapped
    one at a time, so that each fp32 weight is freed (where nothing else holds it) before the
    next is quantized: a loaded model is never held in fp32 and int8 at once."""
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao, whose CPU path is not fast yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        import torch.ao.nn.quantized.dynamic as quantized
        from torch.ao.quantization import per_channel_dynamic_qconfig

        # Names, not modules: a list of the modules would keep every fp32 layer alive to the end.
        for path in [name for name, module in model.named_modules() if type(module) is nn.Linear]:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            linear = getattr(parent, name)
            linear.qconfig = per_channel_dynamic_qconfig
            setattr(parent, name, quantized.Linear.from_float(linear))
            del linear
    return model
