"""The inference engine: token ids in, next-token logits and sampled ids out. It knows nothing of
tokenizers or text (sampling.py turns it into text), and is shared by `generate`, the Python API
and the server.

- Slots: the engine decodes up to `slots` sequences at once, each with its own length, in one
  preallocated KV cache. Prompts of different lengths can share a batch; a sequence can start in
  a free slot while the others are mid-way (the server's continuous batching).
- CPU: exact fp32 (these CPUs have no bf16 units), laid out by weights.py, or int8 weights
  with `quantize="int8"` (see quantize.py).
- CUDA: bf16 weights and cache; the one-token step runs over the whole static cache with a mask,
  so its shapes never change, and is captured once per batch size in a CUDA graph that replays
  the ~100 kernels of a step with one launch.
- Past the context window a sequence slides: see `Engine.step`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from microgpt_cli.config import MAX_SEED, ModelConfig, check_threads
from microgpt_cli.device import allocation_errors, free_memory, lazy_zeros
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.threads import ThreadChooser
from microgpt_cli.infer.weights import RowBlockLinear, inference_model
from microgpt_cli.model.gpt import GPT

__all__ = ["MAX_SLOTS", "Engine", "RowBlockLinear", "SlotCache", "inference_model", "make_generators", "sample_next"]

GREEDY_BELOW = 1e-30  # temperatures under this sample as 0 does: float32 cannot divide by much less
MAX_SLOTS = 1024
GROW_STEP = 128  # cache positions added at a time


class SlotCache:
    """Keys and values of every layer for `slots` sequences (implements model.KVCache).

    A short sample never pays for a cache of the whole context. `paged` (the default on a CPU):
    each layer's tensors, (slots, heads, positions, head size), span the whole context from the
    start, in memory the system backs with a page only when it is first written
    (device.lazy_zeros), so the cache grows 4 KB at a time (16 positions of one head of GPT-2)
    and is never copied to grow. Otherwise they hold the positions in use rounded up to
    GROW_STEP and grow (one layer at a time, by a copy) as the sequences do, up to the context;
    with `grow=False` (CUDA graphs, which replay fixed addresses) they hold the whole context
    from the start. Before each forward the engine says what it is: a prefill of one slot from
    position 0, or a step of slots 0..n-1, each at its own position."""

    def __init__(self, config: ModelConfig, slots: int, device: torch.device, dtype: torch.dtype, grow: bool = True,
                 paged: bool | None = None):
        self.shape = (slots, config.n_head, 0, config.head_size)
        self.context = config.context
        self.device, self.dtype = device, dtype
        self.paged = device.type == "cpu" if paged is None else paged
        self.keys = [self._empty(0) for _ in range(config.n_layer)]
        self.values = [self._empty(0) for _ in range(config.n_layer)]
        self.capacity = 0
        self.reserve(GROW_STEP if grow else config.context)
        self.grow = grow
        self.key_index = torch.arange(config.context, device=device)
        self.row_index = torch.arange(slots, device=device)
        self.positions = self.key_index[:0].unsqueeze(0)
        self.mask: torch.Tensor | None = None
        self._rows = slice(0, 1)
        self._span = 0
        self._write_at: torch.Tensor | None = None  # (n,) positions of a step; None for a prefill

    def _empty(self, positions: int) -> torch.Tensor:
        # Zeros, not empty memory: a row shorter than the step's span reads (masked) positions past
        # its own, and NaN bits there would survive the mask.
        return torch.zeros((*self.shape[:2], positions, *self.shape[3:]), device=self.device, dtype=self.dtype)

    def reserve(self, positions: int) -> None:
        """Make room for `positions` positions per slot."""
        if positions <= self.capacity:
            return
        with allocation_errors(f"the KV cache of {self.shape[0]:,} sequences", "decode fewer at once"):
            if self.paged and self._map_whole_context():
                return
            self.paged = False  # the mapping was refused (an address-space limit): grow by copies
            capacity = min(self.context, -(-positions // GROW_STEP) * GROW_STEP)
            for store in (self.keys, self.values):
                for layer, old in enumerate(store):
                    new = self._empty(capacity)
                    new[:, :, : self.capacity] = old
                    store[layer] = new
            self.capacity = capacity

    def _map_whole_context(self) -> bool:
        """Give every layer tensors for the whole context in memory backed page by page as it is
        written; False, and nothing changed, where the system refuses such a mapping."""
        layers = len(self.keys)
        whole = [lazy_zeros((*self.shape[:2], self.context, *self.shape[3:]), self.dtype) for _ in range(2 * layers)]
        mapped = [tensor for tensor in whole if tensor is not None]
        if len(mapped) < len(whole):
            return False
        self.keys, self.values = mapped[:layers], mapped[layers:]
        self.capacity = self.context
        return True

    def copy_slot(self, source: int, target: int, length: int) -> None:
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target, :, :length] = tensor[source, :, :length]

    def for_prefill(self, slot: int, length: int) -> SlotCache:
        self._rows, self._span, self._write_at, self.mask = slice(slot, slot + 1), length, None, None
        self.positions = self.key_index[:length].unsqueeze(0)
        return self

    def for_step(self, positions: torch.Tensor, span: int, masked: bool = True) -> SlotCache:
        """A step of slots 0..n-1 (n = len(positions)), attending to the first `span` cache
        positions, of which each row sees those up to its own (`masked` False: every row is at
        position span - 1, so all of them)."""
        n = positions.size(0)
        self._rows, self._span, self._write_at = slice(0, n), span, positions
        self.positions = positions.unsqueeze(1)  # (n, 1)
        self.mask = (self.key_index[:span].unsqueeze(0) <= self.positions).view(n, 1, 1, span) if masked else None
        return self

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer][self._rows], self.values[layer][self._rows]  # views, (n, nh, capacity, hs)
        if self._write_at is None:
            keys[:, :, : k.size(2)] = k
            values[:, :, : v.size(2)] = v
        else:
            rows = self.row_index[: k.size(0)]
            keys[rows, :, self._write_at] = k[:, :, 0]
            values[rows, :, self._write_at] = v[:, :, 0]
        return keys[:, :, : self._span], values[:, :, : self._span]


class Engine:
    """A model ready to decode up to `slots` sequences at once.

    `prefill(slot, ids)` starts the sequence of a slot; `step(tokens)` appends one token to each
    of slots 0..n-1 and returns their next-token logits. Logits are float32 on every device.
    `model` is the converted model itself: `model(idx)` is an uncached forward, logits (B, T, vocab).

    The caller's `model` is left as it is, unless `in_place` (it was loaded for the engine alone):
    then it is converted itself, so the weights are never held twice. On CPU each call runs with
    the number of threads, up to `threads` (default: torch's), that has been fastest for it
    (see threads.py).

    Positions never go past the context the model was trained on. When a sequence fills the
    window, its newest `context // 2` tokens (the new one included) are re-prefilled from
    position 0, as the start of a fresh window. That costs a prefill of context/2 tokens once
    every context/2 steps (under one extra token per step, amortized), while the model always
    keeps at least half a window of history; each slot slides on its own schedule, so a
    sequence decodes the same whether or not others share its batch."""

    def __init__(self, model: GPT, slots: int = 1, quantize: str | None = None, graphs: bool | None = None, *,
                 in_place: bool = False, threads: int | None = None):
        if not 1 <= slots <= MAX_SLOTS:
            raise MicroGPTError(f"the batch must hold 1 to {MAX_SLOTS:,} sequences, got {slots:,}")
        most = check_threads(threads) or torch.get_num_threads()
        self.config = model.config
        self.num_params = model.num_params()
        self.device = model.tok_emb.weight.device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise MicroGPTError("CUDA graphs need a CUDA device")
        self.model = inference_model(model, quantize, in_place, slots, most if self.device.type == "cpu" else 1)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.weights = "int8" if quantize == "int8" else str(dtype).removeprefix("torch.")
        c = self.config
        cache_bytes = 2 * c.n_layer * slots * c.context * c.n_embed * dtype.itemsize
        free = free_memory(self.device)
        if free is not None and cache_bytes > free:
            raise MicroGPTError(f"a batch of {slots:,} sequences needs {cache_bytes / 1e9:,.1f} GB of KV cache, more "
                                f"than the {free / 1e9:,.1f} GB free on {self.device}; decode fewer at once")
        self.slots = slots
        self.context = self.config.context
        self.keep = max(1, self.context // 2)
        self.cache = SlotCache(self.config, slots, self.device, dtype, grow=not self.graphs)
        self.lengths = [0] * slots  # tokens each slot's cache holds, mirrored on the device:
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.history = torch.zeros((slots, self.context), dtype=torch.long, device=self.device)  # to slide
        self.threads = ThreadChooser(most if self.device.type == "cpu" else 1)
        self._captured: dict[int, _CapturedStep] = {}

    @torch.inference_mode()
    def prefill(self, slot: int, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Start slot `slot` over from `ids`, of which the last `context` are kept; the next-token logits (vocab,)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)[-self.context :]
        if ids.numel() == 0:
            raise ValueError("prefill needs at least one token")
        length = ids.numel()
        self.cache.reserve(length)
        cache = self.cache.for_prefill(slot, length)
        # The head runs on the last position only: all that decoding needs from a prompt.
        logits = self.threads.run("prefill", lambda: self.model.logits(self.model.hidden(ids[None], cache)[:, -1])[0],
                                  length)
        self.history[slot, :length] = ids
        self._set_length(slot, length)
        return logits.float()

    @torch.inference_mode()
    def fork(self, source: int, targets: Sequence[int]) -> None:
        """Copy the sequence of slot `source` into the `targets` slots (one prompt, many samples)."""
        for target in targets:
            self.cache.copy_slot(source, target, self.lengths[source])
            self.history[target] = self.history[source]
            self._set_length(target, self.lengths[source])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens[i] to the sequence of slot i, for i < n = len(tokens); next-token logits (n, vocab)."""
        n = tokens.size(0)
        for row in range(n):
            if self.lengths[row] == self.context:
                self._slide(row)
        self.history[self.cache.row_index[:n], self.positions[:n]] = tokens
        if self.graphs:
            if n not in self._captured:
                self._captured[n] = _CapturedStep(self, n)
            logits = self._captured[n](tokens)
        else:
            lengths = self.lengths[:n]
            span = max(lengths) + 1
            self.cache.reserve(span)
            masked = min(lengths) + 1 < span
            logits = self.threads.run(("step", n), lambda: self.forward_step(tokens, span, masked))
        self.positions[:n] += 1
        for row in range(n):
            self.lengths[row] += 1
        return logits

    def forward_step(self, tokens: torch.Tensor, span: int, masked: bool = True) -> torch.Tensor:
        """The model over one new token per slot 0..n-1, attending to the first `span` positions
        of the cache (the whole context when captured, so that shapes never change); `masked`
        False when every row is at position span - 1."""
        n = tokens.size(0)
        cache = self.cache.for_step(self.positions[:n], span, masked)
        return self.model(tokens.view(n, 1), cache=cache)[:, -1].float()

    def release(self, slot: int) -> None:
        """Mark a slot free: it holds nothing, and a step that includes it (to reach slots after it)
        only writes its position 0."""
        self._set_length(slot, 0)

    def _slide(self, row: int) -> None:
        kept = self.history[row, self.context - self.keep + 1 :].clone()  # the new token makes `keep`
        if kept.numel():
            self.prefill(row, kept)
        else:
            self._set_length(row, 0)

    def _set_length(self, slot: int, length: int) -> None:
        self.lengths[slot] = length
        self.positions[slot] = length


class _CapturedStep:
    """Engine.forward_step for n slots over the whole cache, recorded once in a CUDA graph and
    replayed per token: inputs and outputs live in fixed buffers the graph reads and writes."""

    def __init__(self, engine: Engine, n: int):
        self.tokens = torch.zeros(n, dtype=torch.long, device=engine.device)
        # Kernels run once outside the graph before capture (cuBLAS picks its algorithms, memory
        # pools warm up); the writes they make land at positions the real step then overwrites.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                engine.forward_step(self.tokens, engine.context)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = engine.forward_step(self.tokens, engine.context)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the buffer


def make_generators(device: torch.device, seed: int | None, n: int) -> list[torch.Generator]:
    """One random stream per sample: sample i draws from seed + i, so it is the same sample
    whether it is decoded alone (with that seed) or in a batch. Seeds wrap at MAX_SEED, which
    every device's generator honours whole (the CPU's keeps 32 bits)."""
    generators = []
    for i in range(n):
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed((seed + i) % (MAX_SEED + 1))
        generators.append(generator)
    return generators


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
                generators: Sequence[torch.Generator | None], counts: torch.Tensor | None = None,
                frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> torch.Tensor:
    """Next token ids (B,) from logits (B, vocab), row i drawing from generators[i].

    With `counts` (B, vocab), how often each row has sampled each token so far, the penalties
    lower the logits of tokens already sampled as OpenAI's API defines them: by
    `frequency_penalty` per time, and by `presence_penalty` once (negative values raise them).
    They apply before temperature, top-k and top-p, greedy decoding included."""
    logits = logits.float()
    if counts is not None and (frequency_penalty or presence_penalty):
        logits = logits - frequency_penalty * counts - presence_penalty * (counts > 0).float()
    if temperature < GREEDY_BELOW:  # 0, or so small that it is greedy in all but float32 overflow
        return logits.argmax(dim=-1)
    # With top-k, the rest works on the k best logits of each row only (k of ~50k for GPT-2).
    candidates = None
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # (B, k), likeliest first
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then sends the others
    # to -inf (greedy in the limit) instead of overflowing every logit to inf and softmax to NaN.
    probs = F.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the likelier ones before it already cover top_p; the likeliest always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop[:, 0] = False  # even where top_p rounds to 0 in float32
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    # The exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. draws token t with probability
    # p_t, like torch.multinomial, but with each row's noise from its own generator and the pick
    # itself batched. A zero probability never wins.
    noise = torch.empty_like(probs)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    picked = (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
    return picked if candidates is None else candidates.gather(-1, picked[:, None])[:, 0]


def count_sampled(counts: torch.Tensor, tokens: torch.Tensor) -> None:
    """Add one to counts[i, tokens[i]] for every row i (the tally the penalties of sample_next read)."""
    counts.scatter_add_(1, tokens[:, None], torch.ones_like(counts[:, :1]))
