"""`microgpt import`: random transformers GPT-2 models built here (no network), imported exactly."""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from microgpt_cli.errors import MicroGPTError
from microgpt_cli.io import checkpoint
from microgpt_cli.io.export import export
from microgpt_cli.io.pretrained import import_model

from clitools import GPT2_SHAPES, assert_one_error_line, hf_gpt2, microgpt, run_cli

transformers = pytest.importorskip("transformers")

@pytest.mark.parametrize("shape", list(GPT2_SHAPES))
def test_imported_logits_equal_transformers(shape: str, tmp_path: Path) -> None:
    source = hf_gpt2(tmp_path / "hf", **GPT2_SHAPES[shape])
    run = microgpt("import", source, "--out", tmp_path / "model.pt")
    assert "wrote" in run.stderr and "gpt2 tokenizer" in run.stderr
    model, tokenizer = checkpoint.load_checkpoint(tmp_path / "model.pt")
    c = model.config
    assert (c.context, c.n_embed, c.position, c.norm, c.activation, c.tie_weights, c.bias) == (
        GPT2_SHAPES[shape]["n_positions"], GPT2_SHAPES[shape]["n_embd"], "learned", "layernorm", "gelu", True, True)
    assert tokenizer.kind == "gpt2"
    reference = transformers.GPT2LMHeadModel.from_pretrained(source).eval()
    idx = torch.randint(0, 50257, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx).logits, atol=1e-4, rtol=0)


def test_export_of_an_import_reproduces_the_tensors(tmp_path: Path) -> None:
    source = hf_gpt2(tmp_path / "hf")
    import_model(str(source), tmp_path / "model.pt")
    export(tmp_path / "model.pt", tmp_path / "again", "hf")
    original, again = load_file(source / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert set(original) <= set(again)
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name


@pytest.mark.parametrize("format", ["hf", "safetensors"])
def test_microgpt_exports_import_back(format: str, make_checkpoint, tmp_path: Path) -> None:
    if format == "hf":  # an hf export needs a GPT-2 shaped model with the GPT-2 tokenizer
        import_model(str(hf_gpt2(tmp_path / "hf")), tmp_path / "start.pt")
        start = tmp_path / "start.pt"
    else:
        start = make_checkpoint(position="rope", tie_weights=False)
    export(start, tmp_path / "exported", format)
    run = microgpt("import", tmp_path / "exported", "--out", tmp_path / "back.pt")
    a, b = checkpoint.load(start), checkpoint.load(tmp_path / "back.pt")
    assert a.model_config == b.model_config and a.tokenizer == b.tokenizer
    assert f"{a.tokenizer_object().name} tokenizer" in run.stderr  # the export's own, not always GPT-2's
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


def test_imported_model_generates(tmp_path: Path) -> None:
    import_model(str(hf_gpt2(tmp_path / "hf")), tmp_path / "model.pt")
    run = microgpt("generate", "-c", tmp_path / "model.pt", "--prompt", "Hello", "--length", "5", "--device", "cpu")
    assert run.stdout.startswith("Hello")


def test_bad_sources_are_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = hf_gpt2(tmp_path / "hf")
    (tmp_path / "empty").mkdir()

    def variant(name: str, **overrides: Any) -> Path:
        return hf_gpt2(tmp_path / name, **overrides)

    truncated = variant("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((good / "config.json").read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(os.system))  # would run code if unpickled freely
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    cases = {
        str(tmp_path / "nope"): "neither a directory nor a known Hub name",
        str(tmp_path / "empty"): "has no config.json",
        str(truncated): "not a readable safetensors file",
        str(pickled): "pytorch_model.bin",
        str(variant("scaled", scale_attn_by_inverse_layer_idx=True)): "scale_attn_by_inverse_layer_idx",
        str(variant("exact-gelu", activation_function="gelu")): "activation_function 'gelu'",
        str(variant("untied", tie_word_embeddings=False)): "untied head",
        "gpt2": "cannot download gpt2",
    }
    for source, message in cases.items():
        with pytest.raises(MicroGPTError, match=message):
            import_model(source, tmp_path / "out.pt")
        assert not (tmp_path / "out.pt").exists()
    import_model(str(good), tmp_path / "out.pt")
    with pytest.raises(MicroGPTError, match="already exists; pass --force"):
        import_model(str(good), tmp_path / "out.pt")
    run = microgpt("import", tmp_path / "nope", "--out", tmp_path / "x.pt", check=False)
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


def _rewrite_weights(directory: Path, change: Any) -> None:
    """Apply `change` to the tensors of a saved transformers model (name -> tensor dict), in place."""
    from safetensors.torch import save_file

    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_gpt2_attention_mask_buffers_are_not_imported_as_weights(tmp_path: Path) -> None:
    """The Hub's GPT-2 files hold h.N.attn.bias (a causal mask) and h.N.attn.masked_bias, next to
    the real h.N.attn.c_attn.bias: constants, not weights, and never mixed up with them."""
    source = hf_gpt2(tmp_path / "hf")
    reference = transformers.GPT2LMHeadModel.from_pretrained(source).eval()
    n_pos = GPT2_SHAPES["small"]["n_positions"]

    def add_buffers(tensors: dict[str, torch.Tensor]) -> None:
        for i in range(GPT2_SHAPES["small"]["n_layer"]):
            tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
            tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        for name in [n for n in tensors if n.startswith("transformer.")]:  # as the Hub stores them: no prefix
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)

    _rewrite_weights(source, add_buffers)
    _, model, _ = import_model(str(source), tmp_path / "model.pt")
    names = checkpoint.load(tmp_path / "model.pt").model
    assert not any("mask" in name or name.endswith(".attn.bias") for name in names)
    idx = torch.randint(0, 50257, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx).logits, atol=1e-4, rtol=0)


def test_weights_that_config_json_does_not_describe_are_refused(tmp_path: Path) -> None:
    """It used to import the first n_layer layers of a deeper model, and NaN, infinite or int8
    weights, whose model then printed GGGGGGG with exit status 0."""
    import json

    source = hf_gpt2(tmp_path / "hf")  # two layers
    config = json.loads((source / "config.json").read_text())

    def variant(name: str, change: Any = None, **config_changes: Any) -> str:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
        (directory / "config.json").write_text(json.dumps({**config, **config_changes}))
        if change is not None:
            _rewrite_weights(directory, change)
        return str(directory)

    def poison(value: float) -> Any:
        return lambda t: t["transformer.h.1.mlp.c_fc.weight"].view(-1).__setitem__(7, value)

    def to_int8(tensors: dict[str, torch.Tensor]) -> None:
        tensors["transformer.h.0.attn.c_proj.weight"] = tensors["transformer.h.0.attn.c_proj.weight"].to(torch.int8)

    cases = {
        variant("fewer-layers", n_layer=1): "says n_layer 1, but the weights hold 2 layers (h.0 to h.1)",
        variant("nan", poison(math.nan)): "NaN or infinite values in transformer.h.1.mlp.c_fc.weight",
        variant("inf", poison(math.inf)): "NaN or infinite values in transformer.h.1.mlp.c_fc.weight",
        variant("int8", to_int8): "holds transformer.h.0.attn.c_proj.weight as int8; model weights must be floating",
    }
    for directory, message in cases.items():
        with pytest.raises(MicroGPTError, match=re.escape(message)):
            import_model(directory, tmp_path / "out.pt")
        assert not (tmp_path / "out.pt").exists()


def test_force_replaces_only_a_checkpoint_and_clears_what_a_killed_import_left(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = hf_gpt2(tmp_path / "hf")
    capsys.readouterr()  # transformers' own progress bar
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    code, _, err = run_cli(capsys, "import", source, "--out", notes, "--force")
    assert_one_error_line(code, err, "notes.txt is not a microgpt checkpoint; --force replaces only those")
    assert notes.read_text() == "my notes"
    # What `kill -9` leaves mid-write (atomic_write's temp file, the lock) goes at the next import.
    import tempfile

    fd, partial = tempfile.mkstemp(prefix=".model.pt.", suffix=".tmp", dir=tmp_path)
    os.write(fd, b"PK\x03\x04 half a checkpoint")
    os.close(fd)
    (tmp_path / ".model.pt.lock").write_text("12345\n")
    (tmp_path / "model.pt").write_bytes((tmp_path / "notes.txt").read_bytes())
    code, _, err = run_cli(capsys, "import", source, "--out", tmp_path / "model.pt", "--force")
    assert_one_error_line(code, err, "model.pt is not a microgpt checkpoint")
    (tmp_path / "model.pt").unlink()
    code, _, err = run_cli(capsys, "import", source, "--out", tmp_path / "model.pt")
    assert code == 0, err
    assert not Path(partial).exists() and not (tmp_path / ".model.pt.lock").exists()
    code, _, err = run_cli(capsys, "import", source, "--out", tmp_path / "model.pt", "--force")  # its own: replaced
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.pt", "notes.txt"]
