"""Contracts between modules: the CLI's options are the dataclasses' fields (defaults, help,
choices), the model's parameter names are the ones export.py and optim.py rely on, the checkpoint
layout is read in one place, and cheap commands stay cheap to start."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest
import torch
import typer.main

from microgpt_cli.cli import app
from microgpt_cli.config import ModelConfig, SamplingSettings, TrainConfig
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.io import checkpoint
from microgpt_cli.io.export import GPT2_BLOCK_NAMES
from microgpt_cli.model.gpt import BLOCK_MATRICES, BLOCK_PARAMS, GPT, TOP_LEVEL_PARAMS, block_param
from microgpt_cli.serve.settings import ServeSettings
from microgpt_cli.training import distributed
from microgpt_cli.training.loop import build_run

from clitools import assert_one_error_line, run_cli


def command(name: str) -> Any:
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def options_of(name: str) -> dict[str, Any]:
    return {p.name: p for p in command(name).params}


def choices(param: Any) -> tuple[str, ...] | None:
    found = param.type_descriptor.choices if param.type_descriptor.is_choice else None
    return tuple(str(c) for c in found) if found is not None else None


@pytest.mark.parametrize(("cls", "cmd", "skip"), [
    (ModelConfig, "train", {"vocab_size"}), (TrainConfig, "train", set()), (SamplingSettings, "generate", set()),
    (ServeSettings, "serve", set()),
])
def test_every_setting_is_an_option_with_the_fields_default_help_and_choices(
        cls: type, cmd: str, skip: set[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # --help unwrapped, so that each choice list and default is on one line
    options = options_of(cmd)
    hints = get_type_hints(cls)
    code, help_text, _ = run_cli(capsys, cmd, "--help")
    assert code == 0
    help_text = " ".join(help_text.replace("│", " ").split())
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        option = options[field.name]
        default = option.default.value if hasattr(option.default, "value") else option.default
        assert (str(default) if isinstance(default, Path) else default) == field.default, field.name
        assert option.help == field.metadata["help"], field.name
        hint = hints[field.name]
        if get_origin(hint) is Literal:
            assert choices(option) == get_args(hint), field.name
            assert "|".join(get_args(hint)) in help_text, field.name  # --help lists the choices
        flags = field.metadata["flags"] or ("--" + field.name.replace("_", "-"),)
        assert all(flag.split("/")[0] in option.opts for flag in flags), (field.name, option.opts)
        if field.default not in (None, False, True, ""):  # "" (none, as for --init-from) shows no default
            assert f"[default: {field.default}]" in help_text, field.name  # --help shows the real default
    extra = set(options) - {f.name for f in dataclasses.fields(cls)}
    expected_extra = {"train": {"config", "preset", "resume", "force"} | {f.name for f in dataclasses.fields(
        TrainConfig if cls is ModelConfig else ModelConfig)} - {"vocab_size"},
        "generate": {"checkpoint", "prompt", "prompt_file", "num_samples", "quantize", "device", "threads",
                     "config"},
        "serve": {"checkpoint", "quantize", "device", "threads"}}[cmd]
    assert extra == expected_extra


def test_the_models_parameter_names_are_the_declared_contract() -> None:
    """export.py maps BLOCK_PARAMS to GPT-2's names and optim.py gives BLOCK_MATRICES to Muon by
    name: a renamed module must fail here, not in a silent export or a wrong optimizer."""
    config = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embed=16, context=8, tie_weights=False)
    names = set(GPT(config).state_dict())
    declared = set(TOP_LEVEL_PARAMS) | {block_param(i, n) for i in range(2) for n in BLOCK_PARAMS}
    assert names == declared
    assert set(GPT2_BLOCK_NAMES) == set(BLOCK_PARAMS) and set(BLOCK_MATRICES) <= set(BLOCK_PARAMS)
    model = GPT(config)
    assert set(model.block_matrices()) == {block_param(i, n) for i in range(2) for n in BLOCK_MATRICES}
    assert all(p.dim() == 2 for p in model.block_matrices().values())


def test_build_run_leaves_the_callers_config_alone(data_dir: Path, tmp_path: Path) -> None:
    config = ModelConfig(n_layer=1, n_head=2, n_embed=16, context=8)
    before = dataclasses.replace(config)
    run = build_run(config, TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), batch_size=2),
                    resume=False, force=False, world=distributed.World())
    assert config == before and run.model_config.vocab_size != config.vocab_size


def test_resuming_with_another_number_of_optimizers_is_an_error(data_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    tiny = ["--n-layer", "1", "--n-embed", "16", "--n-head", "2", "--context", "8", "--batch-size", "2",
            "--eval-tokens", "50", "--device", "cpu"]
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", out, *tiny, "--max-steps", "2",
                           "--eval-interval", "2")
    assert code == 0, err
    state = checkpoint.load(out / "last.pt")
    assert state.training is not None
    state.training.optimizers.append(state.training.optimizers[0])  # as if saved by a Muon run
    checkpoint.save(out / "last.pt", state)
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", out, "--resume", "--max-steps", "4")
    assert code == 1 and "holds the state of 2 optimizer(s) but this run builds 1" in err, err


def test_checkpoint_round_trips_through_its_type(tmp_path: Path, char_tokenizer: Any) -> None:
    from conftest import tiny_model

    model = tiny_model(char_tokenizer.vocab_size)
    training = checkpoint.TrainingState([{"state": {}, "param_groups": []}], 7, 12.5, 1.25, 2)
    state = checkpoint.Checkpoint.of(model, char_tokenizer, TrainConfig(lr=1e-3), {"inputs": ["ab"]},
                                     {"step": 7, "val_loss": 1.5}, training)
    checkpoint.save(tmp_path / "c.pt", state)
    again = checkpoint.load(tmp_path / "c.pt")
    assert again.model_config == model.config and again.tokenizer == char_tokenizer.spec
    assert again.training == training and again.step == 7 and again.best_val == 1.25 and again.val_loss == 1.5
    assert again.train_settings.lr == 1e-3 and again.input_hashes == ["ab"]
    assert all(torch.equal(v, state.model[k]) for k, v in again.model.items())
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    raw["model_config"]["n_layer"] = "two"
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(MicroGPTError, match="bad.pt is not a valid microgpt checkpoint: n_layer must be an integer"):
        checkpoint.load(tmp_path / "bad.pt")


def test_help_and_info_do_not_import_torch_or_matplotlib() -> None:
    """`microgpt --help` and tab completion run the CLI module: it must not wait for torch (~1 s)."""
    code = ("import sys, microgpt_cli.cli, microgpt_cli.plot, microgpt_cli.io.export; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    code = "import sys, microgpt_cli.training.loop; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"  # a plot is drawn only at an evaluation


COMMANDS = ("prepare", "train", "eval", "generate", "chat", "import", "serve", "info", "plot", "export")


def test_help_reads_at_80_columns_with_value_names_and_without_aliases(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every --help at 80 columns: descriptions get at least 38 columns (train's got 22), values are
    named as a user reads them (no <list[str]>, {source}, <float>), aliases are accepted but not listed."""
    monkeypatch.setenv("COLUMNS", "80")
    shown: dict[str, str] = {}
    for name in ("", *COMMANDS):
        code, out, err = run_cli(capsys, *([name] if name else []), "--help")
        assert code == 0, err
        assert all(len(line) <= 80 for line in out.splitlines()), out
        for leak in ("<list", "<int>", "<float>", "<str>", "<path>", "<bool>", "{", "}"):  # a flag takes no value
            assert leak not in out, (name, leak)
        for alias in ("--n-ma", "--text-size", "--batches", "--n-embd", "--block-size", "--max-new-tokens"):
            assert alias not in out, (name, alias)
        shown[name] = out
    train = shown["train"]
    description = re.search(r"--max-steps\s+INTEGER\s+(Stop after)", train)
    assert description is not None and description.start(1) - train.rfind("\n", 0, description.start(1)) <= 42
    assert re.search(r"--preset\s+NAME\s", train)
    presets = " ".join(train.replace("│", " ").split())
    assert all(f"{name}: " in presets for name in ("cpu", "finetune", "sft", "gpt2")) and "gpt2: GPT-2 small" in presets
    assert re.search(r"--tie-weights\s+Share", train) and "--untie-weights" in train  # a negative under its flag
    assert "Usage: microgpt import [OPTIONS] SOURCE" in shown["import"]
    assert "Usage: microgpt plot [OPTIONS] RUN_DIRS..." in shown["plot"]
    assert "Usage: microgpt prepare [OPTIONS] [INPUTS]..." in shown["prepare"]
    evaluate = " ".join(shown["eval"].replace("│", " ").split())
    assert "--data PATH Prepared data dir whose whole validation split is scored. [env var: MICROGPT_DATA] " \
           "[default: data]" in evaluate  # not "(data)"
    quantize = evaluate.split("--quantize")[1]
    assert "dynamic int8" in quantize and "weight-only" not in quantize  # what the README says it is


def test_a_bare_microgpt_prints_the_help_and_nothing_else(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys)
    assert code == 0 and "Usage: microgpt" in out and "Commands" in out and err == "", err


def test_aliases_reach_their_settings(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """nanoGPT's and litgpt's names (--n-embd, --block-size, --max-new-tokens) and the original ones
    (--n-ma, --text-size, --batches) set the same settings as the listed names, in flags and in
    --config files alike."""
    config = tmp_path / "run.toml"
    config.write_text("n_embd = 16\nbatches = 2\n")
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "run", "--config", config,
                           "--n-layer", "1", "--n-ma", "2", "--block-size", "8", "--max-steps", "1",
                           "--eval-tokens", "20", "--device", "cpu")
    assert code == 0, err
    state = checkpoint.load(tmp_path / "run")
    assert (state.model_config.n_embed, state.model_config.n_head, state.model_config.context) == (16, 2, 8)
    assert state.train_settings.batch_size == 2
    code, out, err = run_cli(capsys, "generate", "-c", tmp_path / "run", "--prompt", "Hi", "--max-new-tokens", "7",
                             "--text-size", "3")
    assert_one_error_line(code, err, "--text-size")  # a train option, not one of generate's
    code, out, err = run_cli(capsys, "generate", "-c", tmp_path / "run", "--prompt", "Hi", "--max-new-tokens", "7")
    assert code == 0 and "7 tokens in" in err, err
