"""The GPT module and its architecture options, on real torch."""

from __future__ import annotations

import math

import pytest
import torch

from microgpt_cli.config import InvalidSetting, ModelConfig, resolve
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.model import GPT, apply_rotary, rotary_tables

SMALL = dict(vocab_size=50, n_layer=2, n_head=2, n_embed=16, context=12, dropout=0.0)
OPTIONS = [
    {},
    {"position": "rope"},
    {"norm": "rmsnorm"},
    {"activation": "relu2"},
    {"activation": "gelu"},
    {"qk_norm": True},
    {"tie_weights": False},
    {"bias": False},
    {"position": "rope", "norm": "rmsnorm", "activation": "relu2", "qk_norm": True, "tie_weights": False, "bias": False},
]


def model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**SMALL, **overrides}))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_every_option_trains(options: dict) -> None:
    gpt = model(**options)
    idx = torch.randint(0, 50, (4, 12))
    logits = gpt(idx)
    assert logits.shape == (4, 12, 50)
    initial = gpt(idx, idx).item()
    assert initial == pytest.approx(math.log(50), abs=0.3)  # near uniform at init
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-2)
    for _ in range(30):
        loss = gpt(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < initial / 2  # it can learn to copy its input


def test_attention_is_causal() -> None:
    gpt = model().eval()
    idx = torch.randint(0, 50, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    assert torch.allclose(gpt(idx)[0, :8], gpt(changed)[0, :8], atol=1e-6)
    assert not torch.allclose(gpt(idx)[0, 8:], gpt(changed)[0, 8:])


def test_options_change_the_modules() -> None:
    default, custom = model(), model(tie_weights=False, bias=False, norm="rmsnorm", position="rope")
    assert default.head.weight is default.tok_emb.weight
    assert custom.head.weight is not custom.tok_emb.weight
    assert custom.pos_emb is None and default.pos_emb is not None
    assert not any(name.endswith("bias") for name, _ in custom.named_parameters())
    assert isinstance(custom.norm, torch.nn.RMSNorm) and isinstance(default.norm, torch.nn.LayerNorm)
    assert custom.num_params() > default.num_params() - default.pos_emb.weight.numel()


def test_rope_scores_depend_on_relative_position_only() -> None:
    q, k = torch.randn(8), torch.randn(8)
    cos, sin = rotary_tables(8, 40)

    def score(i: int, j: int) -> float:
        return float(apply_rotary(q, cos[i], sin[i]) @ apply_rotary(k, cos[j], sin[j]))

    assert score(5, 2) == pytest.approx(score(35, 32), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_flops_per_token_counts_matmuls() -> None:
    gpt = model()
    c = gpt.config
    matrices = c.n_layer * 12 * c.n_embed**2 + c.vocab_size * c.n_embed  # blocks + tied head
    assert gpt.flops_per_token() >= 6 * matrices


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"n_embed": 30, "n_head": 4}, "divisible"),
        ({"n_layer": 0}, "--n-layer"),
        ({"dropout": 1.0}, "--dropout"),
        ({"position": "alibi"}, "--position"),
        ({"norm": "batchnorm"}, "--norm"),
        ({"activation": "swish"}, "--activation"),
    ],
)
def test_config_validation(bad: dict, message: str) -> None:
    """The library names the field (n_layer); the CLI shows the flag (--n-layer)."""
    with pytest.raises(InvalidSetting) as raised:
        ModelConfig(**{**SMALL, **bad})
    assert message in raised.value.with_flags()
    field = message.removeprefix("--").replace("-", "_")
    assert field in str(raised.value) and "--" not in str(raised.value)


def test_presets_fill_options_and_flags_win() -> None:
    model_kwargs, train_kwargs = resolve("gpt2", {"n_layer": 2, "lr": None})
    assert model_kwargs["n_layer"] == 2 and model_kwargs["n_embed"] == 768 and model_kwargs["context"] == 1024
    assert train_kwargs["compile"] is True and train_kwargs["lr"] == 6e-4
    model_kwargs, train_kwargs = resolve("cpu", {"optimizer": "adamw"})
    assert model_kwargs["position"] == "rope" and model_kwargs["qk_norm"] is True
    assert train_kwargs["optimizer"] == "adamw" and train_kwargs["batch_size"] == 24
    with pytest.raises(InvalidSetting, match="preset 'huge'") as raised:
        resolve("huge", {})
    assert "--preset" in raised.value.with_flags()
