"""The GPT model, readable top to bottom: embeddings, blocks of masked multi-head self-attention
and a two-layer feed-forward network, a final norm and a linear head to token logits.

Options that change the specified model (rotary positions, RMSNorm, QK-norm, ReLU², untied head)
are off by default; see ModelConfig.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from microgpt_cli.config import ModelConfig

# Parameter names are a contract: checkpoints store the weights under them, export.py maps them to
# GPT-2's, optim.py hands the blocks' matrices to Muon. They are spelled here, once; a test checks
# that the modules below produce exactly these names.
TOP_LEVEL_PARAMS = ("tok_emb.weight", "pos_emb.weight", "norm.weight", "norm.bias", "head.weight")
BLOCK_PARAMS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.up.weight", "mlp.up.bias", "mlp.down.weight", "mlp.down.bias",
)
BLOCK_MATRICES = ("attn.qkv.weight", "attn.proj.weight", "mlp.up.weight", "mlp.down.weight")
RESIDUAL_PROJECTIONS = ("attn.proj.weight", "mlp.down.weight")  # scaled down by depth at init


def block_param(layer: int, name: str) -> str:
    """The full name of parameter `name` (one of BLOCK_PARAMS) of block `layer`."""
    return f"blocks.{layer}.{name}"


def count_params(config: ModelConfig) -> int:
    """The parameters GPT(config) has, counted without building it, so that a size that cannot fit
    in memory is refused before any allocation."""
    c, v, bias = config.n_embed, config.padded_vocab, int(config.bias)
    norm = c * (2 if config.norm == "layernorm" and config.bias else 1)
    attention = (3 * c * c + 3 * c * bias) + (c * c + c * bias)
    mlp = (4 * c * c + 4 * c * bias) + (4 * c * c + c * bias)
    total = v * c + config.n_layer * (2 * norm + attention + mlp) + norm
    if config.position == "learned":
        total += config.context * c
    if not config.tie_weights:
        total += v * c
    return total


class KVCache(Protocol):
    """What the model needs from an inference cache; the implementation lives in engine.py.

    A forward with a cache either starts its sequences at position 0 (`mask` None: causal) or
    appends one token per sequence, each at its own position (`mask` says which cached keys
    each new token sees)."""

    positions: torch.Tensor  # (B, T): the position of each new token
    mask: torch.Tensor | None  # (B, 1, T, keys), True where a query sees a key

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values of `layer`; all the keys and values to attend to."""
        ...


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, bias=config.bias)


def rotary_tables(head_size: int, length: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    # Made on the CPU even where the model is built on the meta device (GPT.from_weights): these
    # buffers are not saved, so they must be real; `.to(device)` moves them with the model.
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32, device="cpu") / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device="cpu"), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # rotate the two halves of each head as complex pairs
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skips torch.nn.init's fills while modules are made for weights that are assigned next."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row (a decode step) on a CPU, as two batched products. torch's
    fused CPU kernel splits a one-query attention by its thread count, so a step's last bits
    changed with the number of threads the engine chose for it, and a seed's text now and then
    with them; batched products split only the batch among threads. As fast at 8 rows, about
    15 us more per layer at one (GPT-2's shapes, 2 threads)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.size(-1) ** -0.5
    if mask is not None:  # True where a position takes part, as for scaled_dot_product_attention
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.head_size = config.head_size
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embed, 3 * config.n_embed, bias=config.bias)
        self.proj = nn.Linear(config.n_embed, config.n_embed, bias=config.bias)
        self.proj_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_size).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.qk_norm:
            # Normalizing queries and keys bounds attention logits, which tolerates larger LRs.
            q, k = F.rms_norm(q, (self.head_size,)), F.rms_norm(k, (self.head_size,))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        mask = None
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
            mask = cache.mask
        if cache is not None and T == 1 and q.device.type == "cpu":
            y = _one_query_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                dropout_p=self.dropout if self.training else 0.0,
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.n_embed, 4 * config.n_embed, bias=config.bias)
        self.down = nn.Linear(4 * config.n_embed, config.n_embed, bias=config.bias)
        self.activation = config.activation
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.activation == "relu2":
            h = F.relu(h).square()
        elif self.activation == "gelu":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.relu(h)
        return self.dropout(self.down(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = make_norm(config, config.n_embed)
        self.attn = CausalSelfAttention(config, layer)
        self.norm2 = make_norm(config, config.n_embed)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.padded_vocab, config.n_embed)  # rows past vocab_size: padding
        self.pos_emb = nn.Embedding(config.context, config.n_embed) if config.position == "learned" else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config, config.n_embed)
        self.head = nn.Linear(config.n_embed, config.padded_vocab, bias=False)
        if config.tie_weights:
            self.head.weight = self.tok_emb.weight
        if config.position == "rope":
            cos, sin = rotary_tables(config.head_size, config.context)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Scale residual projections by depth so the residual stream's variance stays bounded (GPT-2).
        for i in range(config.n_layer):
            for name in RESIDUAL_PROJECTIONS:
                weight = self.get_parameter(block_param(i, name))
                nn.init.normal_(weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_weights(cls, config: ModelConfig, weights: Mapping[str, torch.Tensor]) -> GPT:
        """A model holding the tensors of `weights` (a state dict) themselves: its modules are made
        on the meta device without their random init, so loaded weights are never in memory twice
        (and GPT-2's 124M random numbers are not drawn for nothing). Tensors of another dtype, or
        not contiguous, are converted."""
        with torch.device("meta"), _SkipInit():
            model = cls(config)
        expected = model.state_dict()
        weights = {name: tensor if name not in expected or (tensor.dtype == expected[name].dtype and
                                                          tensor.is_contiguous())
                   else tensor.to(expected[name].dtype).contiguous() for name, tensor in weights.items()}
        model.load_state_dict(weights, assign=True)
        if config.tie_weights:
            model.head.weight = model.tok_emb.weight
        return model

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def block_matrices(self) -> dict[str, nn.Parameter]:
        """The 2-D weights inside the transformer blocks, by name (what Muon optimizes)."""
        return {block_param(i, name): self.get_parameter(block_param(i, name))
                for i in range(self.config.n_layer) for name in BLOCK_MATRICES}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for `idx` (B, T); with `targets`, the mean cross-entropy instead."""
        logits = self.logits(self.hidden(idx, cache))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final normalized hidden states (B, T, C) for `idx` (B, T): what the head turns into
        logits. Scoring applies the head only at the positions it scores."""
        T = idx.size(1)
        x = self.tok_emb(idx)  # (B, T, C)
        rotary = None
        if self.pos_emb is not None:
            positions = torch.arange(T, device=idx.device) if cache is None else cache.positions  # (T,) or (B, T)
            x = x + self.pos_emb(positions)
        else:
            cos, sin = self.get_buffer("rope_cos"), self.get_buffer("rope_sin")
            if cache is None:
                rotary = (cos[:T], sin[:T])  # (T, hs/2)
            else:
                rotary = (cos[cache.positions].unsqueeze(1), sin[cache.positions].unsqueeze(1))  # (B, 1, T, hs/2)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, rotary, cache)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) of final hidden states (..., C)."""
        logits = self.head(hidden)  # (..., padded vocab)
        if self.config.pad_vocab > 1:
            logits = logits[..., : self.config.vocab_size]  # padded ids get no probability, in the loss or sampling
        return logits

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), 6N plus attention (PaLM appendix B)."""
        c = self.config
        n = self.num_params() - (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        if not c.tie_weights:
            n -= self.tok_emb.weight.numel()  # an untied input embedding is a lookup, not a matmul
        return 6 * n + 12 * c.n_layer * c.n_embed * c.context
