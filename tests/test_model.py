"""The GPT module and its architecture options, on real torch."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from microgpt_cli.config import InvalidSetting, ModelConfig, resolve
from microgpt_cli.data.tokenizer import Tokenizer
from microgpt_cli.model.gpt import GPT, apply_rotary, count_params, rotary_tables

from conftest import TINY_TEXT, tiny_model

Weights = dict[str, torch.Tensor]

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
    {"position": "rope", "norm": "rmsnorm", "activation": "relu2", "qk_norm": True, "tie_weights": False,
     "bias": False},
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


@pytest.mark.parametrize("options", [{}, {"tie_weights": False}, {"position": "rope"},
                                     {"position": "rope", "tie_weights": False, "norm": "rmsnorm", "bias": False}],
                         ids=["tied-learned", "untied-learned", "tied-rope", "untied-rope-rmsnorm-nobias"])
def test_flops_per_token_is_the_exact_formula(options: dict) -> None:
    """6 per weight a token is multiplied by (forward + backward) plus 12·L·C·T for attention; the
    embedding lookups (positions, an untied input embedding) are no matmuls and do not count."""
    gpt = model(**options)
    c = gpt.config
    C, V = c.n_embed, c.vocab_size
    norm = 2 * C if c.norm == "layernorm" and c.bias else C  # RMSNorm and bias-free LayerNorm: weight only
    linear_biases = (3 * C + C + 4 * C + C) if c.bias else 0  # qkv, proj, up, down
    block = 12 * C * C + linear_biases + 2 * norm
    counted = c.n_layer * block + norm + V * C  # blocks, final norm, head (the tied embedding counts once)
    assert gpt.flops_per_token() == 6 * counted + 12 * c.n_layer * C * c.context
    looked_up = (c.context * C if c.position == "learned" else 0) + (0 if c.tie_weights else V * C)
    assert counted + looked_up == gpt.num_params()  # the hand count misses no parameter


# --- the options compute what they say: a hand-written forward pass on the model's own weights ---


def reference_logits(gpt: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) in float64 from plain tensor ops, written from the architecture's
    description rather than from gpt.py's modules."""
    c = gpt.config
    w: Weights = {k: v.double() for k, v in gpt.state_dict().items()}
    hs, nh = c.head_size, c.n_head

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ w[f"{name}.weight"].T
        return y + w[f"{name}.bias"] if c.bias else y

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        if c.norm == "rmsnorm":
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w[f"{name}.weight"]
        centred = x - x.mean(-1, keepdim=True)
        y = centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + 1e-5) * w[f"{name}.weight"]
        return y + w[f"{name}.bias"] if c.bias else y

    def activation(h: torch.Tensor) -> torch.Tensor:
        if c.activation == "gelu":  # GPT-2's tanh approximation
            return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        relu = torch.where(h > 0, h, torch.zeros_like(h))
        return relu * relu if c.activation == "relu2" else relu

    def rotate(x: torch.Tensor) -> torch.Tensor:
        # Dimension i pairs with i + hs/2 as one complex number, turned by angle pos * 10000^(-2i/hs).
        half = hs // 2
        freqs = 10000.0 ** (-2 * torch.arange(half, dtype=torch.float64) / hs)
        angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs
        turn = torch.polar(torch.ones_like(angles), angles)
        z = torch.complex(x[..., :half], x[..., half:]) * turn
        return torch.cat((z.real, z.imag), dim=-1)

    B, T = idx.shape
    x = w["tok_emb.weight"][idx]
    if c.position == "learned":
        x = x + w["pos_emb.weight"][:T]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    for i in range(c.n_layer):
        p = f"blocks.{i}."
        qkv = linear(norm(x, p + "norm1"), p + "attn.qkv")
        q, k, v = (t.reshape(B, T, nh, hs).transpose(1, 2) for t in qkv.split(c.n_embed, -1))
        if c.qk_norm:  # eps: torch's default for F.rms_norm, float32's machine epsilon
            q, k = (t / torch.sqrt((t * t).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps) for t in (q, k))
        if c.position == "rope":
            q, k = rotate(q), rotate(k)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(future, -math.inf)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, c.n_embed)
        x = x + linear(y, p + "attn.proj")
        x = x + linear(activation(linear(norm(x, p + "norm2"), p + "mlp.up")), p + "mlp.down")
    head = w["tok_emb.weight"] if c.tie_weights else w["head.weight"]
    return norm(x, "norm") @ head.T


def perturbed(**overrides: object) -> GPT:
    """A model whose weights (biases and norm gains included) are far from their init, so that every
    option changes the logits by far more than the tolerance."""
    gpt = model(**overrides).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    return gpt


REFERENCE_OPTIONS = [
    {}, {"activation": "relu2"}, {"activation": "gelu"}, {"qk_norm": True}, {"norm": "rmsnorm"},
    {"position": "rope"}, {"tie_weights": False}, {"bias": False},
    {"position": "rope", "norm": "rmsnorm", "activation": "relu2", "qk_norm": True, "tie_weights": False,
     "bias": False},
    {"position": "rope", "qk_norm": True, "activation": "gelu", "bias": False},
]


@pytest.mark.parametrize("options", REFERENCE_OPTIONS,
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_logits_match_a_hand_written_forward_pass(options: dict) -> None:
    gpt = perturbed(**options)
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, expected = gpt(idx).double(), reference_logits(gpt, idx)
    assert expected.abs().max() > 1.0  # logits large enough for the comparison to mean something
    assert (ours - expected).abs().max() < 1e-5


@pytest.mark.parametrize(("option", "value"), [
    ("activation", "relu2"), ("activation", "gelu"), ("qk_norm", True), ("norm", "rmsnorm"), ("position", "rope"),
    ("tie_weights", False), ("bias", False),
])
def test_every_option_changes_the_reference_logits(option: str, value: object) -> None:
    """The tolerance above is far below what each option changes: an option the model ignored would fail it."""
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    gpt = perturbed(**{option: value})
    default = perturbed(**{option: getattr(ModelConfig(), option)})
    default.load_state_dict(gpt.state_dict(), strict=False)  # the same weights where both have them
    with torch.no_grad():
        assert (reference_logits(gpt, idx) - reference_logits(default, idx)).abs().max() > 1e-2


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


def padded_twin(model: GPT, pad: int) -> GPT:
    """`model` with its vocabulary padded to a multiple of `pad`: the same weights in the real rows,
    large random ones in the padding (which would win every argmax if they were ever used)."""
    padded = GPT(replace(model.config, pad_vocab=pad)).eval()
    state = dict(model.state_dict())
    for name in ("tok_emb.weight", "head.weight"):
        extra = torch.randn(padded.config.padded_vocab - model.config.vocab_size, model.config.n_embed) * 50
        state[name] = torch.cat([state[name], extra])
    if model.config.tie_weights:
        state["head.weight"] = state["tok_emb.weight"]
    padded.load_state_dict(state)
    return padded


@pytest.mark.parametrize("tie", [True, False])
def test_a_padded_vocabulary_changes_no_logit_loss_or_gradient(tie: bool) -> None:
    model = tiny_model(65, tie_weights=tie)
    padded = padded_twin(model, 64)
    assert padded.tok_emb.weight.shape[0] == padded.config.padded_vocab == 128 and padded.config.vocab_size == 65
    assert count_params(padded.config) == padded.num_params() == model.num_params() + 63 * 32 * (1 if tie else 2)
    idx = torch.randint(0, 65, (3, 16), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 65, (3, 16), generator=torch.Generator().manual_seed(1))
    assert padded(idx).shape == (3, 16, 65)
    torch.testing.assert_close(padded(idx), model(idx), atol=1e-5, rtol=0)
    model.train(), padded.train()
    loss, padded_loss = model(idx, targets), padded(idx, targets)
    torch.testing.assert_close(padded_loss, loss, atol=1e-6, rtol=0)
    padded_loss.backward()
    loss.backward()
    assert padded.head.weight.grad is not None and model.head.weight.grad is not None
    assert torch.all(padded.head.weight.grad[65:] == 0)  # no gradient ever reaches the padding
    torch.testing.assert_close(padded.head.weight.grad[:65], model.head.weight.grad, atol=1e-6, rtol=0)


def test_sampling_and_eval_never_see_the_padding(char_tokenizer: Tokenizer) -> None:
    from microgpt_cli.infer.evaluation import split_loss
    from microgpt_cli.infer.sampling import generate_text

    model = tiny_model(char_tokenizer.vocab_size)
    padded = padded_twin(model, 64)
    # The padded rows' logits are huge: sampled at temperature 2 with no top-k, any leak would show.
    text = generate_text(padded, start_text="Hello", length=300, tokenizer=char_tokenizer, temperature=2.0,
                         top_k=None, seed=3)
    assert len(text) == len("Hello") + 300 and set(text) <= set(char_tokenizer.spec["chars"])
    tokens = np.array(char_tokenizer.encode(TINY_TEXT), dtype=np.int64)
    loss_sum, count, _ = split_loss(padded, tokens, 4, torch.device("cpu"))
    reference_sum, reference_count, _ = split_loss(model, tokens, 4, torch.device("cpu"))
    assert count == reference_count and loss_sum == pytest.approx(reference_sum, rel=1e-5)


def test_dropout_is_off_wherever_a_model_is_scored_or_sampled(char_tokenizer: Tokenizer, tmp_path: Path) -> None:
    """A model with dropout 0.5, handed over in training mode, scores and samples exactly as its
    dropout-free twin: evaluation (also the one inside training), decoding, and a loaded checkpoint."""
    from microgpt_cli.infer.evaluation import split_loss
    from microgpt_cli.infer.sampling import generate_text
    from microgpt_cli.io import checkpoint

    noisy = tiny_model(char_tokenizer.vocab_size, dropout=0.5).train()
    clean = tiny_model(char_tokenizer.vocab_size, dropout=0.0)
    tokens = np.asarray(char_tokenizer.encode(TINY_TEXT))
    assert split_loss(noisy, tokens, 4)[0] == pytest.approx(split_loss(clean, tokens, 4)[0], rel=1e-6)
    assert noisy.training  # handed back as it came
    def sample(model: GPT) -> str:
        return generate_text(model, "Hello", 40, char_tokenizer, temperature=1.0, top_k=None, seed=3)

    assert sample(noisy) == sample(clean)
    checkpoint.save(tmp_path / "noisy.pt", checkpoint.Checkpoint.of(noisy, char_tokenizer))
    loaded, _ = checkpoint.load_checkpoint(tmp_path / "noisy.pt")
    idx = torch.tensor([char_tokenizer.encode(TINY_TEXT[:16])])
    with torch.no_grad():
        assert torch.equal(loaded(idx), loaded(idx)) and torch.allclose(loaded(idx), clean.eval()(idx), atol=1e-6)
    with torch.no_grad():  # teeth: in training mode the same model's logits do move
        assert not torch.equal(noisy.train()(idx), noisy(idx))
