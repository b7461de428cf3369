"""int8 weights for decoding and scoring on CPU, through PyTorch's own quantization.

Each nn.Linear (the head included) becomes PyTorch's dynamic-quantized Linear: int8 weights with
one scale per output row, and activations quantized to int8 per call, so the matrix products run
in fbgemm's int8 kernels. On the 2-core development VM that made the GPT-2-vocabulary head 2.8x
faster at one token and 7x at eight; weight-only int8 kernels (torchao's Int8WeightOnlyConfig,
torch._weight_int8pack_mm) were slower there than fp32, so they are not used. An embedding of
EMBEDDING_INT8_FROM weights or more (a GPT-2-vocabulary token embedding, the largest tensor of
such a model) becomes PyTorch's quantized Embedding (8 bits per weight with a scale and offset
per row, read by `embedding_byte`): a quarter of the fp32 table. The quality cost is measured
with `microgpt eval --quantize int8` (see the README).
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
import torch.nn as nn

from microgpt_cli.device import release_pages

# Embeddings smaller than this stay fp32: a lookup's few rows cost nothing to read, and the int8
# lookup's extra ops made the `--preset cpu` model 5% slower. GPT-2's token embedding (38.6M)
# is quantized, its position embedding (0.8M) is not.
EMBEDDING_INT8_FROM = 1_000_000


def quantize_int8(model: nn.Module, release: bool = False) -> nn.Module:
    """Replace every nn.Linear, and every nn.Embedding of EMBEDDING_INT8_FROM weights or more, in
    `model` by an int8 one, in place, for inference only. A head tied to the embedding gets an
    int8 copy of its own. Layers are swapped one at a time, so that each fp32 weight is freed
    (where nothing else holds it) before the next is quantized: a loaded model is never held in
    fp32 and int8 at once. With `release` (the model is the caller's no more) each fp32 weight
    memory-mapped from a checkpoint is let go as soon as it has been quantized (see
    release_pages)."""
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao, whose CPU path is not fast yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        import torch.ao.nn.quantized as quantized
        import torch.ao.nn.quantized.dynamic as dynamic
        from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig

        kinds = {nn.Linear: (dynamic.Linear.from_float, per_channel_dynamic_qconfig),
                 nn.Embedding: (lambda e: _ContiguousIds(quantized.Embedding.from_float(e)),
                                float_qparams_weight_only_qconfig)}
        # Names, not modules: a list of the modules would keep every fp32 layer alive to the end.
        # The largest first (a GPT-2 head, 154 MB in fp32): its fp32 weight and int8 copies then
        # meet none of the other int8 layers in memory.
        layers = {name: module.weight.numel() for name, module in model.named_modules() if type(module) in kinds
                  and (type(module) is nn.Linear or module.weight.numel() >= EMBEDDING_INT8_FROM)}
        # A tied embedding and head read one tensor: its pages go after the second of them.
        readers = Counter(model.get_parameter(f"{path}.weight").data_ptr() for path in layers)
        for path in sorted(layers, key=layers.__getitem__, reverse=True):
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            layer = getattr(parent, name)
            convert, layer.qconfig = kinds[type(layer)]
            if release and getattr(layer, "bias", None) is not None:  # the int8 layer keeps its bias, not a copy
                layer.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
            setattr(parent, name, convert(layer))
            readers[layer.weight.data_ptr()] -= 1
            if release and not readers[layer.weight.data_ptr()]:
                release_pages(layer.weight)
            del layer
    return model


class _ContiguousIds(nn.Module):
    """A quantized embedding that takes ids in any layout (its kernel reads contiguous ones only)."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding
        self.rows: int = embedding.num_embeddings  # type: ignore[assignment]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # The kernel's own error for an id past the table is a RuntimeError; nn.Embedding's is this.
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.rows):
            raise IndexError(f"token id out of range for an embedding of {self.rows} rows")
        return self.embedding(ids.contiguous())
