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
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from microgpt_cli.device import release_pages

# Embeddings smaller than this stay fp32: a lookup's few rows cost nothing to read, and the int8
# lookup's extra ops made the `--preset cpu` model 5% slower. GPT-2's token embedding (38.6M)
# is quantized, its position embedding (0.8M) is not.
EMBEDDING_INT8_FROM = 1_000_000
QUANTIZE_BLOCK_BYTES = 8 << 20  # fp32 read per block while quantizing


def quantize_int8(model: nn.Module, release: bool = False) -> nn.Module:
    """Replace every nn.Linear, and every nn.Embedding of EMBEDDING_INT8_FROM weights or more, in
    `model` by an int8 one, in place, for inference only. A head tied to the embedding gets an
    int8 copy of its own. Layers are swapped one at a time, so that each fp32 weight is freed
    (where nothing else holds it) before the next is quantized: a loaded model is never held in
    fp32 and int8 at once. With `release` (the model is the caller's no more) each fp32 weight
    memory-mapped from a checkpoint is let go block by block as it is quantized (see _by_rows
    and release_pages)."""
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao, whose CPU path is not fast yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        import torch.ao.nn.quantized as quantized
        import torch.ao.nn.quantized.dynamic as dynamic
        from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig

        def int8_linear(layer: nn.Linear) -> nn.Module:
            # Built 1 x 1 and then given its weight: at full size the constructor packs an empty
            # weight first, 44 MB for a GPT-2 head, alive next to the real one.
            int8 = dynamic.Linear(1, 1, dtype=torch.qint8)
            int8.in_features, int8.out_features = layer.in_features, layer.out_features
            int8.set_weight_bias(_by_rows(layer.weight, per_channel_dynamic_qconfig.weight, release), layer.bias)
            return int8

        def int8_embedding(layer: nn.Embedding) -> nn.Module:
            weight = _by_rows(layer.weight, float_qparams_weight_only_qconfig.weight, release)
            return _ContiguousIds(quantized.Embedding(layer.num_embeddings, layer.embedding_dim, _weight=weight))

        kinds: dict[type, Callable[[Any], nn.Module]] = {nn.Linear: int8_linear, nn.Embedding: int8_embedding}
        # Names, not modules: a list of the modules would keep every fp32 layer alive to the end.
        # The largest first (a GPT-2 head): its int8 copies then meet none of the other int8
        # layers in memory.
        layers = {name: module.weight.numel() for name, module in model.named_modules() if type(module) in kinds
                  and (type(module) is nn.Linear or module.weight.numel() >= EMBEDDING_INT8_FROM)}
        for path in sorted(layers, key=layers.__getitem__, reverse=True):
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            layer = getattr(parent, name)
            if release and getattr(layer, "bias", None) is not None:  # the int8 layer keeps its bias, not a copy
                layer.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
            setattr(parent, name, kinds[type(layer)](layer))
            del layer
    return model


def _by_rows(weight: torch.Tensor, observer: Callable[[], Any], release: bool) -> torch.Tensor:
    """`weight` quantized per row as torch.ao's from_float does it, but one block of rows at a
    time: a row's scale and offset depend on that row alone, so the result is the same, while
    the fp32 weight is never read whole. With `release` each block's pages go as soon as it is
    done (a tied head's second read takes them from the page cache again): quantized whole, a
    GPT-2 embedding's 154 MB in fp32 met its int8 copies, 130 MiB over the loaded model."""
    weight = weight.detach()
    signed = observer().dtype == torch.qint8
    ints = torch.empty(weight.shape, dtype=torch.int8 if signed else torch.uint8)
    scales, offsets = [], []
    rows = max(1, QUANTIZE_BLOCK_BYTES // max(1, weight[0].nbytes))
    for start in range(0, weight.size(0), rows):
        block = weight[start:start + rows]
        watch = observer()
        watch(block)
        scale, offset = watch.calculate_qparams()
        # The qparams' dtypes from_float gives them (torch.ao's _quantize_weight).
        scale, offset = (scale.double(), offset.long()) if signed else (scale.float(), offset.float())
        ints[start:start + rows] = torch.quantize_per_channel(block.float(), scale, offset, 0, watch.dtype).int_repr()
        scales.append(scale)
        offsets.append(offset)
        if release:
            release_pages(block)
    return torch._make_per_channel_quantized_tensor(ints, torch.cat(scales), torch.cat(offsets), 0)


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
