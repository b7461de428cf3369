"""Exact evaluation: every token of a split predicted exactly once, deterministically."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from microgpt_cli.model import GPT


@torch.no_grad()
def split_loss(
    model: GPT, tokens: np.ndarray, batch_size: int, device: torch.device | str = "cpu",
    max_tokens: int = 0, token_bytes: np.ndarray | None = None,
) -> tuple[float, int, int]:
    """Summed cross-entropy (nats), predicted token count and their byte count over `tokens`.

    The split is cut into consecutive windows of the model's context; token i+1 is predicted
    from the window holding token i, so tokens 1..N-1 are each scored once. `max_tokens` > 0
    scores only a prefix (a cheaper estimate during training)."""
    was_training = model.training
    model.eval()
    context = model.config.context
    n = len(tokens) if max_tokens <= 0 else min(len(tokens), max_tokens + 1)
    starts = list(range(0, n - 1, context))
    total, count, nbytes = 0.0, 0, 0
    for i in range(0, len(starts), batch_size):
        group = starts[i : i + batch_size]
        full = [s for s in group if s + context + 1 <= n]
        # Full windows go through as one batch; the single short tail window (if any) on its own.
        for rows, t in ((full, context), ([s for s in group if s not in full], 0)):
            if not rows:
                continue
            t = t or (n - 1 - rows[0])
            idx = np.asarray(rows)[:, None] + np.arange(t + 1)
            chunk = torch.from_numpy(tokens[idx].astype(np.int64)).to(device)
            x, y = chunk[:, :-1], chunk[:, 1:]
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum")
            total += loss.item()
            count += y.numel()
            if token_bytes is not None:
                nbytes += int(token_bytes[y.cpu().numpy()].sum())
    model.train(was_training)
    return total, count, nbytes
