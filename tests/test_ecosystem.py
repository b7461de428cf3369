"""Fitting the ecosystem: --config files, environment variables, `info`, loss plots, `export`
(Hugging Face GPT-2 with logits parity, plain safetensors) and the README's option reference.

Run `python tests/test_ecosystem.py` to rewrite the README's reference tables from the CLI."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import torch

from microgpt_cli.cli import app
from microgpt_cli.config import ModelConfig, TrainConfig, read_toml, save_config
from microgpt_cli.data.tokenizer import from_spec
from microgpt_cli.infer.sampling import generate_text
from microgpt_cli.info import describe
from microgpt_cli.io import checkpoint
from microgpt_cli.io.export import load_safetensors_export
from microgpt_cli.model.gpt import GPT
from microgpt_cli.plot import save_loss_plot

from clitools import assert_one_error_line, microgpt, run_cli

README = Path(__file__).resolve().parents[1] / "README.md"
REFERENCE_START, REFERENCE_END = "<!-- reference:start -->", "<!-- reference:end -->"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, path


@pytest.fixture(scope="module")
def run_dir(small_char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained through a real subprocess with every source of settings at once:
    preset < --config file < environment variable < flag."""
    root = tmp_path_factory.mktemp("run")
    config = root / "train.toml"
    config.write_text(
        'preset = "cpu"\n'  # cpu: context 64, lr 3e-3, rope, relu2, untied ...
        "n_layer = 1\nn_embed = 32\nn_head = 2\ncontext = 32\nbatch_size = 8\nmax_steps = 20\n"
        "eval_interval = 10\neval_tokens = 2000\nlog_interval = 5\n"
        'lr = 0.01\nseed = 7\ndevice = "auto"\n'
    )
    result = microgpt("train", "--config", config, "--data", small_char_data, "--out", root / "out", "--seed", "11",
                      env={"MICROGPT_DEVICE": "cpu"})
    assert result.returncode == 0, result.stderr
    assert "settings" in result.stderr and "n_layer=1" in result.stderr
    return root / "out"


# --- config files and environment variables --------------------------------------------------


def test_train_settings_follow_preset_file_env_flag_precedence(run_dir: Path) -> None:
    state = checkpoint.load(run_dir)
    model, train = asdict(state.model_config), state.train_config
    assert model["position"] == "rope" and model["activation"] == "relu2"  # from the preset
    assert model["context"] == 32 and train["lr"] == 0.01  # the file beats the preset (64, 3e-3)
    assert train["device"] == "cpu"  # the environment variable beats the file
    assert train["seed"] == 11  # the flag beats the file


def test_train_writes_config_toml_and_loss_png(run_dir: Path) -> None:
    """train.py saves OUT/config.toml and OUT/loss.png (config.save_config, plot.save_loss_plot)."""
    saved = read_toml(run_dir / "config.toml")
    assert saved["n_layer"] == 1 and saved["context"] == 32 and saved["position"] == "rope" and saved["seed"] == 11
    assert_png(run_dir / "loss.png")


def test_saved_config_is_a_valid_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save_config(tmp_path, ModelConfig(n_layer=3, vocab_size=65), TrainConfig(lr=1e-4, data="d ä\"x"))
    assert read_toml(path)["data"] == 'd ä"x' and "vocab_size" not in read_toml(path)
    # --config is processed before --help, so this checks every key without training.
    code, out, err = run_cli(capsys, "train", "--config", path, "--help")
    assert code == 0, err


@pytest.mark.parametrize(("text", "fragments"), [
    ("n_layers = 4\n", ["unknown key 'n_layers'", "n_layer"]),
    ('lr = "fast"\n', ["lr must be a number", "'fast'"]),
    ("n_layer = 2.5\n", ["n_layer must be an integer"]),
    ("[model]\nn_layer = 2\n", ["model must be a single"]),
    ("n_layer = \n", ["not valid TOML"]),
])
def test_bad_config_files_are_one_clear_line(text: str, fragments: list[str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    code, _, err = run_cli(capsys, "train", "--config", config, "--data", tmp_path)
    assert code == 1 and "Traceback" not in err
    assert all(f in err for f in fragments), err
    code, _, err = run_cli(capsys, "generate", "--config", tmp_path / "missing.toml")
    assert code == 1 and "does not exist" in err


def test_eval_and_generate_take_config_files(run_dir: Path, small_char_data: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "t.txt"
    text.write_text("ROMEO:\nWhat light through yonder window breaks?\n")
    config = tmp_path / "eval.toml"
    config.write_text(f'checkpoint = "{run_dir}"\ndata = "{small_char_data}"\njson = true\nbatch_size = 2\n')
    code, out, err = run_cli(capsys, "eval", "--config", config, "--text", text)  # --text beats the file's data
    assert code == 0, err
    assert json.loads(out)["tokens"] == len(text.read_text()) - 1

    config = tmp_path / "gen.toml"
    config.write_text(f'checkpoint = "{run_dir}"\nprompt = "ROMEO"\nlength = 5\nseed = 3\ndevice = "cpu"\n')
    result = microgpt("generate", "--config", config, "--length", "9")
    assert result.returncode == 0, result.stderr
    assert result.stdout == generate_text(run_dir, "ROMEO", 9, seed=3, device="cpu") + "\n"


def test_environment_variables_set_the_default_paths(run_dir: Path, small_char_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # no out/ or data/ here: only the variables can point at them
    monkeypatch.setenv("MICROGPT_OUT", str(run_dir))
    monkeypatch.setenv("MICROGPT_DATA", str(small_char_data))
    monkeypatch.setenv("MICROGPT_DEVICE", "cpu")
    code, out, err = run_cli(capsys, "eval", "--json", "--batch-size", "64")
    assert code == 0, err
    assert json.loads(out)["tokens"] == describe(small_char_data)["splits"]["val"]["tokens"] - 1
    code, out, err = run_cli(capsys, "info", "--json")
    assert code == 0 and json.loads(out)["path"] == str(run_dir)
    monkeypatch.setenv("MICROGPT_DEVICE", "tpu")
    code, _, err = run_cli(capsys, "generate", "--length", "2")
    assert code == 1 and "tpu" in err
    code, out, _ = run_cli(capsys, "eval", "--help")
    assert "MICROGPT_OUT" in out and "MICROGPT_DATA" in out and "MICROGPT_DEVICE" in out


# --- info ------------------------------------------------------------------------------------


def test_info_on_run_dir_checkpoint_and_data_dir(run_dir: Path, small_char_data: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "info", run_dir, "--json")
    assert code == 0, err
    run = json.loads(out)
    model = GPT(checkpoint.load(run_dir).model_config)
    assert run["kind"] == "run" and run["model"]["params"] == model.num_params()
    vocab_size = json.loads((small_char_data / "meta.json").read_text())["vocab_size"]
    assert run["tokenizer"] == {"kind": "char", "name": "char", "vocab_size": vocab_size, "chat_template": None}
    assert run["training"]["step"] == 20 and run["training"]["best_val_loss"] > 0 and run["training"]["elapsed"] > 0
    assert set(run["checkpoints"]) == {"best.pt", "last.pt"}
    assert run["data"]["dir"] == str(small_char_data)

    code, out, _ = run_cli(capsys, "info", run_dir / "best.pt", "--json")
    ckpt = json.loads(out)
    assert ckpt["kind"] == "checkpoint" and ckpt["file"]["bytes"] == (run_dir / "best.pt").stat().st_size
    assert ckpt["training"]["resumable"] is False

    code, out, _ = run_cli(capsys, "info", small_char_data, "--json")
    data = json.loads(out)
    assert data["kind"] == "data" and data["dtype"] == "uint16" and data["splits"]["train"]["tokens"] > 0
    assert data["inputs"][0]["path"].endswith("shakespeare.txt")

    result = microgpt("info", run_dir)  # the table, through a real process
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "best val loss" in result.stdout
    assert f"char ({vocab_size} tokens)" in result.stdout


def test_info_refuses_what_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    for path, fragment in ((tmp_path / "missing", "does not exist"), (tmp_path / "notes.txt", "not a checkpoint"),
                           (tmp_path / "empty", "neither a run dir")):
        code, out, err = run_cli(capsys, "info", path)
        assert code == 1 and fragment in err and out == "" and "Traceback" not in err


# --- plots -----------------------------------------------------------------------------------


def test_loss_plot_of_one_run_and_of_a_single_point(run_dir: Path, tmp_path: Path) -> None:
    assert_png(save_loss_plot(run_dir))
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "metrics.jsonl").write_text('{"step": 1, "epoch": 0.1, "train_loss": 4.2, "lr": 0.001, '
                                        '"tokens_per_sec": 10.0, "elapsed": 0.5, "val_loss": 4.3, "tokens": 256}\n'
                                        '{"step": 2, "train_lo')  # a line cut mid-write is skipped
    assert_png(save_loss_plot(lone))


def test_plot_command_draws_several_runs(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "train_loss": 5.0 - s / 10, "elapsed": s / 5, "tokens": s * 256,
                    **({"val_loss": 5.1 - s / 10} if s % 10 == 0 else {})}) + "\n" for s in range(5, 25, 5)))
    result = microgpt("plot", run_dir, other, "--out", tmp_path / "runs.png")
    assert result.returncode == 0, result.stderr
    assert_png(tmp_path / "runs.png")
    code, _, err = run_cli(capsys, "plot", other, "--x", "time", "-o", tmp_path / "time.png")
    assert code == 0, err
    assert_png(tmp_path / "time.png")
    code, _, err = run_cli(capsys, "plot", run_dir, tmp_path, "-o", tmp_path / "x.png")
    assert code == 1 and "has no metrics.jsonl" in err and not (tmp_path / "x.png").exists()


def test_plot_format_follows_the_suffix(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, magic in (("runs.svg", b"<?xml"), ("runs.PDF", b"%PDF-"), ("runs.png", PNG_MAGIC)):
        code, _, err = run_cli(capsys, "plot", run_dir, "--out", tmp_path / name)
        assert code == 0, err
        assert (tmp_path / name).read_bytes().startswith(magic), name
    (tmp_path / "notes.txt").write_text("kept")
    for name in ("notes.txt", "runs"):  # a PNG under another name would be a surprise: refused, nothing written
        code, _, err = run_cli(capsys, "plot", run_dir, "--out", tmp_path / name)
        assert_one_error_line(code, err, "name a .png, .svg or .pdf file")
    assert (tmp_path / "notes.txt").read_text() == "kept" and not (tmp_path / "runs").exists()


# --- export ----------------------------------------------------------------------------------


def _checkpoint(path: Path, tokenizer_spec: dict[str, Any], **overrides: Any) -> tuple[Path, GPT]:
    """A tiny random model whose weights are far from init, so a wrong mapping shows in the logits."""
    tokenizer = from_spec(tokenizer_spec)
    torch.manual_seed(0)
    config = dict(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embed=32, context=16, dropout=0.0)
    model = GPT(ModelConfig(**{**config, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    checkpoint.save(path, checkpoint.Checkpoint.of(model, tokenizer))
    return path, model


@pytest.mark.parametrize(("tokenizer", "activation", "tie", "pad"), [
    ("gpt2", "relu", True, 1), ("gpt2", "gelu", False, 1), ("char", "gelu", True, 1), ("char", "relu", False, 1),
    ("gpt2", "gelu", True, 128), ("char", "relu", False, 64),  # padded rows stay out of the export
])
def test_hf_export_matches_microgpt_logits(tokenizer: str, activation: str, tie: bool, pad: int,
                                           tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from microgpt_cli.io.export import export

    spec = {"kind": "gpt2"} if tokenizer == "gpt2" else {"kind": "char", "chars": "".join(map(chr, range(32, 127)))}
    path, model = _checkpoint(tmp_path / "m.pt", spec, activation=activation, tie_weights=tie, pad_vocab=pad)
    export(path, tmp_path / "hf", "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.transformer.wte.weight.shape[0] == hf.config.vocab_size == model.config.vocab_size
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.abs().max() > 1.0  # logits large enough for the comparison to mean something
    assert (ours - theirs).abs().max() < 1e-4
    assert (hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()) == tie
    if tokenizer == "gpt2":
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
        text = "Hello world! It's naïve 日本\n\n  ok"
        assert hf_tokenizer(text)["input_ids"] == from_spec(spec).encode(text)
        assert hf.config.eos_token_id == 50256
    else:
        assert not (tmp_path / "hf" / "vocab.json").exists() and hf.config.eos_token_id is None


def test_export_command_writes_a_loadable_hf_dir_and_refuses_to_overwrite(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _checkpoint(tmp_path / "m.pt", {"kind": "gpt2"})
    result = microgpt("export", "-c", path, "--format", "hf", "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
        "special_tokens_map.json"}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_positions"] == 16 and config["activation_function"] == "relu"
    code, _, err = run_cli(capsys, "export", "-c", path, "--out", tmp_path / "hf")
    assert code == 1 and "--force" in err
    code, _, err = run_cli(capsys, "export", "-c", path, "--out", tmp_path / "hf", "--force", "--format", "safetensors")
    assert code == 0, err
    assert not (tmp_path / "hf" / "vocab.json").exists()  # replaced whole, not merged
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("position", "rope", "--position rope"), ("norm", "rmsnorm", "--norm rmsnorm"),
    ("activation", "relu2", "--activation relu2"), ("qk_norm", True, "--qk-norm"), ("bias", False, "--no-bias"),
])
def test_hf_export_refuses_what_gpt2_cannot_express(option: str, value: object, fragment: str,
                                                    make_checkpoint: Callable[..., Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = make_checkpoint(**{option: value})
    code, _, err = run_cli(capsys, "export", "-c", path, "--out", tmp_path / "hf", "--format", "hf")
    assert code == 1 and fragment in err and "--format safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("tie", [True, False])
def test_safetensors_export_reloads_identically(tie: bool, run_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    source = run_dir
    if tie:  # the trained run is untied; a tied model stores the shared tensor once
        source, _ = _checkpoint(tmp_path / "tied.pt", {"kind": "char", "chars": "abc"}, position="rope")
    code, _, err = run_cli(capsys, "export", "-c", source, "--format", "safetensors", "--out", tmp_path / "st")
    assert code == 0, err
    model, tokenizer = load_safetensors_export(tmp_path / "st")
    original, original_tokenizer = checkpoint.load_checkpoint(source)
    assert tokenizer == original_tokenizer
    assert model.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in model.state_dict().items())
    assert (model.head.weight is model.tok_emb.weight) == tie


# --- README reference ------------------------------------------------------------------------


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(param: Any) -> str:
    if isinstance(param.show_default, str):
        return param.show_default
    if param.show_default is False or param.default is None or getattr(param, "is_flag", False):
        return ""
    value = param.default.value if isinstance(param.default, Enum) else param.default
    return str(value)


def reference_markdown() -> str:
    """Tables of every command's arguments and options, generated from the Typer app."""
    import typer.main

    group: Any = typer.main.get_command(app)
    parts = ["| option | description |", "|---|---|"]
    parts += [f"| `{', '.join(p.opts)}` | {_cell(p.help)} |" for p in group.params]
    for name, command in group.commands.items():
        parts += ["", f"**`microgpt {name}`** — {_cell(command.help)}", "",
                  "| argument / option | default | env var | description |", "|---|---|---|---|"]
        for p in command.params:
            names = ", ".join(p.opts + p.secondary_opts) if p.param_type_name == "option" else p.name.upper()
            default = _default(p)
            parts.append(f"| `{names}` | {f'`{default}`' if default else ''} | {p.envvar or ''} | {_cell(p.help)} |")
    return "\n".join(parts)


def _readme_with_reference(readme: str) -> str:
    pattern = re.compile(re.escape(REFERENCE_START) + ".*?" + re.escape(REFERENCE_END), re.S)
    return pattern.sub(lambda m: f"{REFERENCE_START}\n{reference_markdown()}\n{REFERENCE_END}", readme)


def test_readme_reference_lists_every_command_and_option() -> None:
    readme = README.read_text(encoding="utf-8")
    assert REFERENCE_START in readme and REFERENCE_END in readme
    assert readme == _readme_with_reference(readme), (
        "README's reference tables differ from the CLI; regenerate them with `python tests/test_ecosystem.py`")


if __name__ == "__main__":
    README.write_text(_readme_with_reference(README.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"updated the reference tables in {README}")
