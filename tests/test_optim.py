"""Optimizers and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from microgpt_cli.config import ModelConfig, TrainConfig
from microgpt_cli.model.gpt import GPT
from microgpt_cli.training.optim import Muon, build_optimizers, lr_factor, newton_schulz


def test_newton_schulz_orthogonalizes_in_fp32() -> None:
    g = torch.randn(64, 32)
    x = newton_schulz(g)
    assert x.dtype == torch.float32 and x.shape == g.shape
    singular = torch.linalg.svdvals(x)
    assert singular.min() > 0.5 and singular.max() < 1.5  # all pushed toward 1
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), x.flatten(), dim=0) > 0.95


def test_muon_minimizes_a_matrix_objective() -> None:
    torch.manual_seed(0)
    target = torch.randn(16, 16)
    w = torch.nn.Parameter(torch.zeros(16, 16))
    opt = Muon([w], lr=0.05)
    losses = []
    for _ in range(100):
        loss = ((w - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_muon_takes_only_the_blocks_matrices() -> None:
    gpt = GPT(ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embed=16, context=8))
    adamw, muon = build_optimizers(gpt, TrainConfig(optimizer="muon"), torch.device("cpu"))
    muon_params = {id(p) for p in muon.param_groups[0]["params"]}
    names = {n for n, p in gpt.named_parameters() if id(p) in muon_params}
    assert names and all(n.startswith("blocks.") and n.endswith("weight") and "norm" not in n for n in names)
    adamw_params = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert adamw_params.isdisjoint(muon_params)
    assert len(adamw_params | muon_params) == len(list(gpt.parameters()))
    assert id(gpt.tok_emb.weight) in adamw_params


def test_adamw_groups_decay_only_matrices() -> None:
    gpt = GPT(ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embed=16, context=8))
    (adamw,) = build_optimizers(gpt, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(step, 100, cfg) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)


def test_time_budget_ends_the_schedule_when_time_runs_out() -> None:
    cfg = TrainConfig(warmup_steps=0, min_lr_ratio=0.0, time_budget=60)
    assert lr_factor(10, 10_000, cfg, elapsed=30) == pytest.approx(0.5)
    assert lr_factor(10, 10_000, cfg, elapsed=60) == pytest.approx(0.0)
