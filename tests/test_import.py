"""`microgpt import`: random transformers GPT-2 models built here (no network), imported exactly."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from microgpt_cli.errors import MicroGPTError
from microgpt_cli.io import checkpoint
from microgpt_cli.io.export import export
from microgpt_cli.io.pretrained import import_model

from clitools import GPT2_SHAPES, hf_gpt2, microgpt

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
