"""The model's weights laid out for inference: what the engine decodes and scores with.

- CPU, fp32 (exact), by the rows a step computes. For one row (one sample at a time) every
  linear layer keeps its weight as stored, (out, in), read as one block of rows per thread (see
  RowBlockLinear), copied into memory backed by 2 MB pages (see device.in_huge_pages), and a
  tied embedding reads the head's tensor. For several rows the blocks' weights are prepacked by
  oneDNN, the library inductor's freezing pass packs them with (`torch.ops.mkldnn`): on the
  2-core AMD EPYC development VM a step of 8 tokens ran 1.4-2x faster than through MKL, whose
  fp32 GEMM takes a slow path on that CPU; a tied head then runs through oneDNN with the
  embedding's own tensor (SourceLinear), an untied one is prepacked too. Layers are converted
  one at a time, and the pages of a checkpoint's weight a copy replaced are let go, so the
  whole model is never held twice either way.
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
import torch.nn.functional as F

from microgpt_cli.device import file_mapped, in_huge_pages, release_freed_memory, release_pages
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.model.gpt import BLOCK_MATRICES, GPT, block_param

ROW_BLOCK_ROWS = 256  # rows up to which RowBlockLinear's blocks are at least as fast as nn.Linear's GEMM
# Weights smaller than this are not split among threads: reading them takes less time than the
# extra ops (the `--preset cpu` model's layers, 64K parameters, ran faster in one block).
SPLIT_FROM = 1 << 18


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


class RowBlockLinear(nn.Module):
    """nn.Linear for steps of one or a few rows, with its weight as stored, (out, in), read as
    `split` blocks of whole rows, (split, out / split, in): one batched product computes a block
    per thread, each output the dot product of a contiguous weight row with the input.

    torch runs one row's product on a single thread whatever its thread count, through a
    matrix-vector kernel that read GPT-2's weights at 12-17 GB/s on the 2-core development VM;
    the blocks read them at 43-52 GB/s with 2 threads (22-27 with 1), and a GPT-2 124M step
    took 15.5-16.5 ms against 24 with the transposed copy this replaced. A few rows (a prompt)
    multiply each block transposed, the fastest of the kernels tried for 2 to 256 rows; past
    that nn.Linear's GEMM is used. The blocks are views of the weight: no padded or transposed
    copy."""

    def __init__(self, linear: nn.Linear, split: int = 1, release: bool = False):
        super().__init__()
        self.weight = in_huge_pages(linear.weight.detach(), release)  # (out, in), which a tied embedding reads too
        self.out_features, self.in_features = self.weight.shape
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        # Blocks start `step` rows apart and are `width` rows tall. Where the block count does not
        # divide the rows (GPT-2's 50,257), the blocks overlap instead of being padded, which would
        # copy the weight; the count is the most, up to `split`, that reads under 1% of the rows
        # twice (768 rows in 56 blocks would read 3.9x the weight, in 48 once).
        out = self.out_features
        split = min(split, out) if self.weight.numel() >= SPLIT_FROM else 1
        split = max(n for n in range(1, split + 1) if n * _block_rows(out, n)[1] <= out + out // 100)
        self.step, width = _block_rows(out, split)
        self.blocks = self.weight.as_strided((split, width, self.in_features), (self.step * self.in_features,
                                                                               self.in_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        n, split = rows.size(0), self.blocks.size(0)
        if n > ROW_BLOCK_ROWS or self.weight.numel() < SPLIT_FROM:  # a small layer: one op is what costs
            return F.linear(x, self.weight, self.bias)
        if n == 1:  # each output a dot product of a weight row with x
            y = torch.bmm(self.blocks, rows.t().expand(split, -1, -1)).transpose(1, 2)  # (split, 1, width)
        else:  # x times each block transposed: MKL's fast GEMM for a few rows
            y = torch.bmm(rows.expand(split, -1, -1), self.blocks.transpose(1, 2))  # (split, n, width)
        if y.size(2) == self.step:  # the blocks side by side
            y = y.transpose(0, 1).reshape(n, self.out_features)
        else:  # overlapping blocks: each one up to where the next starts, the last one whole
            y = torch.cat((y[:-1, :, : self.step].transpose(0, 1).reshape(n, -1), y[-1]), dim=1)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def _block_rows(rows: int, blocks: int) -> tuple[int, int]:
    """(step, width): `blocks` blocks of `width` rows, starting `step` rows apart, that cover
    `rows` rows exactly, the last one ending at the last row."""
    if blocks == 1:
        return rows, rows
    step = (rows - -(-rows // blocks)) // (blocks - 1)
    return step, rows - (blocks - 1) * step


class SourceLinear(nn.Module):
    """The head of a tied model, for steps of several rows: logits^T = W x^T through oneDNN, with
    W, the embedding's (vocab, n_embed) tensor, the source operand, so that the head and the
    embedding share one tensor (1.7x the speed of a transposed copy for 8 rows on the
    development VM)."""

    def __init__(self, linear: nn.Linear, release: bool = False):
        super().__init__()
        self.weight = in_huge_pages(linear.weight.detach(), release)  # (out, in), which the embedding reads too
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        y = torch.ops.mkldnn._linear_pointwise(self.weight, rows, None, "none", [], "").t()  # (rows, out)
        y = y.reshape(*x.shape[:-1], y.size(-1))
        return y if self.bias is None else y + self.bias


def _replace(parent: nn.Module, name: str, make: Any, release: bool = False) -> None:
    """Swap child `name` of `parent` for make(child): the old module (and its weights, if nothing
    else holds them) is freed before the next one is converted, and with `release` its weight's
    pages memory-mapped from a checkpoint are let go too (see release_pages)."""
    old = getattr(parent, name)
    setattr(parent, name, make(old))
    if release:
        release_pages(old.weight)


def _copy_to_convert(model: GPT) -> GPT:
    """A copy of `model` to convert, in which the linear layers (replaced by the conversion,
    which only reads them) still hold the model's own weights: only what is kept is copied."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for parameter in module.parameters(recurse=False):
                memo[id(parameter)] = parameter
    return copy.deepcopy(model, memo)


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
        fast = model if in_place else _copy_to_convert(model)
        if quantize == "int8":
            from microgpt_cli.model.quantize import quantize_int8

            quantize_int8(fast, release=in_place)
        else:
            _pack_fp32(fast, rows, threads, release=in_place)
        _own_memory(fast, caller=None if in_place else model)
        release_freed_memory()
    fast.eval()
    for parameter in fast.parameters():
        parameter.requires_grad_(False)
    return fast


def _pack_fp32(model: GPT, rows: int, threads: int, release: bool) -> None:
    """Lay out `model`'s fp32 weights for steps of up to `rows` rows (see the module doc); with
    `release`, the pages of the weights that copies replace are let go."""
    tied = model.tok_emb.weight is model.head.weight
    onednn = rows > 1 and onednn_linear()
    row_blocks = functools.partial(RowBlockLinear, split=threads if rows == 1 else 1, release=release)
    if onednn:
        _replace(model, "head", functools.partial(SourceLinear, release=release) if tied else PackedLinear, release)
    else:
        _replace(model, "head", row_blocks, release)
    if tied:  # a Parameter of its own over the same tensor: the caller's model is not touched
        model.tok_emb = nn.Embedding.from_pretrained(model.head.weight, freeze=True)
    for layer in range(model.config.n_layer):
        for matrix in BLOCK_MATRICES:  # "attn.qkv.weight", ...
            parent, _, name = block_param(layer, matrix).removesuffix(".weight").rpartition(".")
            _replace(model.get_submodule(parent), name, PackedLinear if onednn else row_blocks, release)


def _own_memory(model: nn.Module, caller: nn.Module | None = None) -> None:
    """Copy what a converted model still reads from a mapped checkpoint (norms, position
    embeddings: small) into memory of its own, and let the file's pages go. The kernel maps a
    file's page cache in large folios, so reading a 3 KB bias there kept megabytes around it
    resident: 98 MB of GPT-2's file after one prompt. With `caller`, the model the conversion
    started from, what is left of its Parameters (an int8 model's small tied embedding) is
    copied instead, so that turning off gradients here never touches the caller's model."""
    held = [(module, name, tensor) for module in model.modules()
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
    copied = file_mapped(t for _, _, t in held) if caller is None else {id(p) for p in caller.parameters()}
    for module, name, tensor in held:
        if id(tensor) not in copied:
            continue
        own = tensor.detach().clone()
        if isinstance(tensor, nn.Parameter):
            own = nn.Parameter(own, requires_grad=False)
        setattr(module, name, own)
        if caller is None:
            release_pages(tensor)
