"""Exports rebuild the same model: the config they write is the checkpoint's, and the reloaded model
computes the checkpoint's logits. (tests/test_ecosystem.py covers the CLI, refusals and HF logits.)"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from microgpt_cli.config import PRESETS, ModelConfig
from microgpt_cli.data.tokenizer import from_spec
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.io import checkpoint
from microgpt_cli.io.export import export, load_safetensors_export
from microgpt_cli.model.gpt import GPT

CHARS = {"kind": "char", "chars": "".join(map(chr, range(32, 127)))}
# The shape options of the cpu preset, every one off the specified model's default.
CPU_SHAPE = {k: v for k, v in PRESETS["cpu"].items()
             if k in ("position", "norm", "activation", "qk_norm", "tie_weights", "bias")}
TINY = dict(n_layer=2, n_head=2, n_embed=32, context=16, dropout=0.0)


def far_from_init(path: Path, spec: dict[str, Any], **overrides: Any) -> GPT:
    """Save a tiny model whose weights are randomized well away from init (so that any option read
    back wrong changes the logits) as a checkpoint at `path`; returns the model."""
    tokenizer = from_spec(spec)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{"vocab_size": tokenizer.vocab_size, **TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    checkpoint.save(path, checkpoint.Checkpoint.of(model, tokenizer))
    return model


def sample_ids(model: GPT) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (2, model.config.context), generator=generator)


def test_cpu_preset_shape_is_what_these_tests_claim() -> None:
    assert CPU_SHAPE == {"position": "rope", "norm": "rmsnorm", "activation": "relu2", "qk_norm": True,
                         "tie_weights": False, "bias": False}


@pytest.mark.parametrize("options", [CPU_SHAPE, {}, {"activation": "gelu", "qk_norm": True, "position": "rope"}],
                         ids=["cpu-preset", "default", "gelu-qknorm-rope-tied"])
def test_safetensors_export_keeps_the_config_and_the_logits(options: dict[str, Any], tmp_path: Path) -> None:
    original = far_from_init(tmp_path / "m.pt", CHARS, **options)
    export(tmp_path / "m.pt", tmp_path / "st", "safetensors")

    written = json.loads((tmp_path / "st" / "config.json").read_text(encoding="utf-8"))
    assert written["model_config"] == asdict(original.config)
    model, tokenizer = load_safetensors_export(tmp_path / "st")
    assert model.config == original.config and tokenizer == from_spec(CHARS)
    idx = sample_ids(original)
    with torch.no_grad():
        ours, theirs = original(idx), model(idx)
    assert ours.abs().max() > 1.0  # logits large enough for the comparison to mean something
    assert torch.equal(ours, theirs)  # same weights, same architecture: bit for bit


@pytest.mark.parametrize(("spec", "options"), [
    ({"kind": "gpt2"}, {"activation": "gelu", "tie_weights": True}),
    (CHARS, {"activation": "relu", "tie_weights": False}),
], ids=["gpt2-gelu-tied", "char-relu-untied"])
def test_hf_export_config_describes_the_checkpoint(spec: dict[str, Any], options: dict[str, Any],
                                                   tmp_path: Path) -> None:
    """Every architecture field transformers reads states the checkpoint's config, and the
    microgpt section carries that config whole."""
    transformers = pytest.importorskip("transformers")
    original = far_from_init(tmp_path / "m.pt", spec, **options)
    c = original.config
    export(tmp_path / "m.pt", tmp_path / "hf", "hf")

    written = json.loads((tmp_path / "hf" / "config.json").read_text(encoding="utf-8"))
    assert written["microgpt"]["model_config"] == asdict(c)
    assert written["microgpt"]["tokenizer"]["kind"] == spec["kind"]
    hf = transformers.GPT2Config.from_pretrained(tmp_path / "hf")
    assert (hf.vocab_size, hf.n_positions, hf.n_embd, hf.n_layer, hf.n_head, hf.n_inner) == (
        c.vocab_size, c.context, c.n_embed, c.n_layer, c.n_head, 4 * c.n_embed)
    assert hf.activation_function == {"gelu": "gelu_new", "relu": "relu"}[c.activation]  # gelu_new: the tanh form
    assert hf.layer_norm_epsilon == 1e-5 and hf.tie_word_embeddings == c.tie_weights
    assert hf.resid_pdrop == hf.embd_pdrop == hf.attn_pdrop == c.dropout


def test_auto_format_picks_what_the_model_can_be(tmp_path: Path) -> None:
    """`export` without --format: a transformers GPT-2 where the architecture allows (hf), else the
    plain weights, saying why, rather than an error on `--preset cpu`'s model."""
    far_from_init(tmp_path / "cpu.pt", CHARS, **CPU_SHAPE)
    far_from_init(tmp_path / "gpt2.pt", CHARS, activation="gelu")
    cpu = export(tmp_path / "cpu.pt", tmp_path / "cpu")
    assert cpu.format == "safetensors" and "--position rope" in cpu.note and "--qk-norm" in cpu.note
    load_safetensors_export(tmp_path / "cpu")
    gpt2 = export(tmp_path / "gpt2.pt", tmp_path / "gpt2")
    assert gpt2.format == "hf" and gpt2.note == ""
    assert json.loads((tmp_path / "gpt2" / "config.json").read_text())["model_type"] == "gpt2"


def test_force_replaces_only_an_export_and_clears_what_a_killed_export_left(tmp_path: Path) -> None:
    far_from_init(tmp_path / "m.pt", CHARS)
    foreign = {"notes": {"todo.txt": "mine"}, "their-hf": {"config.json": '{"model_type": "gpt2"}',
                                                           "model.safetensors": "theirs"}}
    for name, files in foreign.items():
        (tmp_path / name).mkdir()
        for file, text in files.items():
            (tmp_path / name / file).write_text(text)
        with pytest.raises(MicroGPTError, match=f"{name} .*not a dir made by `microgpt export`"):
            export(tmp_path / "m.pt", tmp_path / name, "safetensors", force=True)
        assert {p.name: p.read_text() for p in (tmp_path / name).iterdir()} == files
    # An export killed mid-write (kill -9) leaves a temp dir and its lock; the next export to that dir clears them.
    (tmp_path / ".exp.tmp-0123abcd").mkdir()
    (tmp_path / ".exp.tmp-0123abcd" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".exp.lock").write_text("12345\n")
    export(tmp_path / "m.pt", tmp_path / "exp", "safetensors")
    export(tmp_path / "m.pt", tmp_path / "exp", "hf", force=True)  # its own export: replaced
    assert "model_type" in (tmp_path / "exp" / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "m.pt", "notes", "their-hf"]


def test_hf_export_of_a_chat_model_renders_its_template_in_transformers(tmp_path: Path) -> None:
    """A GPT-2-tokenizer chat model exports its delimiters as added tokens and its template as the
    Jinja that transformers' apply_chat_template runs: the same prompt ids microgpt samples from."""
    transformers = pytest.importorskip("transformers")
    from microgpt_cli.data.chat import ChatFormat, ChatTemplate, Message

    spec = from_spec({"kind": "gpt2"}).with_chat_template(ChatTemplate()).spec
    far_from_init(tmp_path / "m.pt", spec)
    export(tmp_path / "m.pt", tmp_path / "hf", "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [Message("system", "Be brief."), Message("user", "Who art thou?"), Message("assistant", "A friend."),
                Message("user", "Whence?")]
    rendered = hf_tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(rendered["input_ids"]) == ChatFormat(from_spec(spec)).prompt(messages, 10_000)[0]
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == 50262 == len(hf_tokenizer)
