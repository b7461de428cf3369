"""The model's weights laid out for inference: what the engine decodes and scores with.

- CPU, fp32 (exact), by the rows a step computes. For one row (one sample at a time) every
  linear layer keeps its weight transposed, (in, out), so that one token's product is a
  row-major GEMM, the fastest kernel for that shape (1.4x nn.Linear's on the GPT-2 head, and
  5-18% faster than oneDNN's), in one block of columns per thread (see RowMajorLinear); a tied
  embedding reads the columns of the head's tensor. For
  several rows the blocks' weights are prepacked by oneDNN, the library inductor's freezing
  pass packs them with (`torch.ops.mkldnn`): on the 2-core AMD EPYC development VM a step of 8
  tokens ran 1.4-2x faster than through MKL, whose fp32 GEMM takes a slow path on that CPU; a
  tied head then runs through oneDNN with the embedding's own tensor (SourceLinear), an untied
  one is prepacked too. The whole model is never held twice either way.
- CPU, int8: see quantize.py.
- CUDA: bf16 weights.

A checkpoint the engine loaded itself is converted in place, layer by layer, so that a model is
never held twice; a GPT handed in by a caller is left as it is (the engine converts a copy whose
linear layers read the caller's weights).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
import torch.nn as nn

from microgpt_cli.errors import MicroGPTError
from microgpt_cli.model.gpt import BLOCK_MATRICES, GPT, block_param


@functools.cache
def onednn_linear() -> bool:
    """Whether this torch has oneDNN's prepacked fp32 linear (x86 builds do; it is checked once)."""
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2), None)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), weight, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


class PackedLinear(nn.Module):
    """nn.Linear with its weight prepacked by oneDNN for CPU inference (an opaque tensor)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class RowMajorLinear(nn.Module):
    """nn.Linear with its weight stored transposed and contiguous, (in, out): a few tokens'
    matrix product then runs as a row-major GEMM, 1.4-2x faster than the matrix-vector kernel
    nn.Linear reaches for one token.

    That GEMM runs on one thread for one row whatever torch's thread count, so with `split`
    above 1 the output columns are stored as `split` contiguous blocks, (split, in, out/split),
    and one batched product computes them, a block per thread: on the 2-core development VM one
    token's products read the weights at 30 GB/s instead of 19 with 2 threads, and as fast as
    before with 1."""

    def __init__(self, linear: nn.Linear, split: int = 1):
        super().__init__()
        weight = linear.weight.detach()  # (out, in)
        self.out_features, self.in_features = weight.shape
        width = -(-self.out_features // split)  # columns per block, the last one zero-padded
        self.weight_t = weight.new_empty(split, self.in_features, width)  # filled block by block: no padded copy
        for block in range(split):
            part = weight[block * width : (block + 1) * width]
            self.weight_t[block, :, : part.shape[0]].copy_(part.t())
            self.weight_t[block, :, part.shape[0] :].zero_()
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        split, _, width = self.weight_t.shape
        if split == 1:
            y = rows @ self.weight_t[0]
        else:  # (split, rows, width) -> (rows, split * width): the blocks side by side
            y = torch.bmm(rows.expand(split, -1, -1), self.weight_t).transpose(0, 1).reshape(-1, split * width)
            y = y[:, : self.out_features]
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class SourceLinear(nn.Module):
    """The head of a tied model, for steps of several rows: logits^T = W x^T through oneDNN, with
    W, the embedding as stored, the source operand, so that the head needs no copy of its own
    (1.7x the transposed head's speed for 8 rows on the development VM, 0.93x for one)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach()  # (out, in): the embedding's own tensor
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        y = torch.ops.mkldnn._linear_pointwise(self.weight, rows, None, "none", [], "").t()  # (rows, out)
        y = y.reshape(*x.shape[:-1], y.size(-1))
        return y if self.bias is None else y + self.bias


class ColumnEmbedding(nn.Module):
    """The token embedding of a tied model, read from the columns of the head's transposed
    weight so that the two keep sharing one tensor."""

    def __init__(self, head: RowMajorLinear):
        super().__init__()
        self.weight_t = head.weight_t  # (split, n_embed, vocab / split)
        self.vocab = head.out_features

    @property
    def weight(self) -> torch.Tensor:
        """(vocab, n_embed), as nn.Embedding's (a copy when the head is split in blocks)."""
        split, n_embed, width = self.weight_t.shape
        return self.weight_t.transpose(1, 2).reshape(split * width, n_embed)[: self.vocab]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Ids past the vocabulary would land in the blocks' padding (or wrap, for negative ones).
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
            raise IndexError(f"token id out of range for a vocabulary of {self.vocab}")
        width = self.weight_t.shape[2]
        return self.weight_t[ids // width, :, ids % width]


def _replace(parent: nn.Module, name: str, make: Any) -> None:
    """Swap child `name` of `parent` for make(child): the old module (and its weights, if nothing
    else holds them) is freed before the next one is converted."""
    setattr(parent, name, make(getattr(parent, name)))


def _copy_to_convert(model: GPT, keeps_embedding: bool) -> GPT:
    """A copy of `model` to convert, in which the linear layers (replaced by the conversion,
    which only reads them) still hold the model's own weights: only what is kept is copied."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for parameter in module.parameters(recurse=False):
                memo[id(parameter)] = parameter
    fast = copy.deepcopy(model, memo)
    if keeps_embedding and fast.tok_emb.weight is model.tok_emb.weight:  # tied to the head, which is replaced
        fast.tok_emb.weight = nn.Parameter(model.tok_emb.weight.detach().clone())
    return fast


def inference_model(model: GPT, quantize: str | None = None, in_place: bool = False, rows: int = 1,
                    threads: int = 1) -> GPT:
    """`model` laid out for inference (see the module doc) with steps of up to `rows` rows on up
    to `threads` threads, in eval mode without gradients. With `in_place` the model itself is
    converted (the caller gives it up); otherwise it is left alone."""
    device = model.tok_emb.weight.device
    quantize = None if quantize == "none" else quantize
    if quantize not in (None, "int8"):
        raise MicroGPTError(f"unknown quantize {quantize!r}; use none or int8")
    if quantize is not None and device.type != "cpu":
        raise MicroGPTError(f"--quantize {quantize} runs on CPU only; on {device.type} the engine decodes "
                            "with bf16 weights already")
    if device.type != "cpu":
        fast = model if in_place else copy.deepcopy(model)
        fast = fast.to(torch.bfloat16) if device.type == "cuda" else fast
    else:
        fast = model if in_place else _copy_to_convert(model, keeps_embedding=quantize == "int8")
        if quantize == "int8":
            from microgpt_cli.model.quantize import quantize_int8

            quantize_int8(fast)
        else:
            _pack_fp32(fast, rows, threads)
    fast.eval()
    for parameter in fast.parameters():
        parameter.requires_grad_(False)
    return fast


def _pack_fp32(model: GPT, rows: int, threads: int) -> None:
    """Lay out `model`'s fp32 weights for steps of up to `rows` rows (see the module doc)."""
    tied = model.tok_emb.weight is model.head.weight
    onednn = rows > 1 and onednn_linear()
    row_major = functools.partial(RowMajorLinear, split=threads if rows == 1 else 1)
    if onednn:
        _replace(model, "head", SourceLinear if tied else PackedLinear)
    else:
        _replace(model, "head", row_major)
        if tied:
            model.tok_emb = ColumnEmbedding(model.head)  # type: ignore[arg-type, assignment]
    for layer in range(model.config.n_layer):
        for matrix in BLOCK_MATRICES:  # "attn.qkv.weight", ...
            parent, _, name = block_param(layer, matrix).removesuffix(".weight").rpartition(".")
            _replace(model.get_submodule(parent), name, PackedLinear if onednn else row_major)
