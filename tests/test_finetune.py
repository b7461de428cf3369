"""`microgpt train --init-from`: fine-tuning starts from a checkpoint's weights (an import or a run),
with its shape and tokenizer, a fresh optimizer and schedule, and a record of where it started."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from microgpt_cli.config import PRESETS, InvalidSetting, ModelConfig, TrainConfig, resolve
from microgpt_cli.errors import Interrupted
from microgpt_cli.io import checkpoint
from microgpt_cli.training.events import Event, StepDone
from microgpt_cli.training.loop import train

from clitools import SHAKESPEARE, assert_one_error_line, hf_gpt2, microgpt, run_cli

pytest.importorskip("transformers")

RUN = ["--context", "32", "--batch-size", "8", "--eval-tokens", "2000"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny GPT-2 (context 48, 40 wide) through `microgpt import`."""
    root = tmp_path_factory.mktemp("import")
    microgpt("import", hf_gpt2(root / "hf"), "--out", root / "gpt2.pt")
    return root / "gpt2.pt"


@pytest.fixture(scope="module")
def pretrained(imported: Path, small_gpt2_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The import trained a little on the data: a start whose val loss is far from a random model's."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    microgpt("train", "--init-from", imported, "--data", small_gpt2_data, "--out", out, *RUN, "--lr", "3e-3",
             "--max-steps", "40", "--eval-interval", "40", "--warmup-steps", "5")
    return out


def metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_finetune_starts_where_its_checkpoint_stands_and_lowers_the_val_loss(
        pretrained: Path, imported: Path, small_gpt2_data: Path, tmp_path: Path) -> None:
    start_val = metrics(pretrained)[-1]["val_loss"]
    assert start_val < 9.0 < metrics(pretrained)[0]["val_loss"]  # the import (random) starts near ln(50257)
    out = tmp_path / "finetuned"
    run = microgpt("train", "--init-from", pretrained, "--preset", "finetune", "--data", small_gpt2_data, "--out", out,
                   *RUN, "--max-steps", "40", "--eval-interval", "20")
    assert f"starting from {pretrained / 'best.pt'}" in run.stderr
    rows = metrics(out)
    # The evaluation before the first step scores the start weights: the pretraining's last val loss,
    # on the same validation tokens.
    assert rows[0]["step"] == 0 and "train_loss" not in rows[0]
    assert rows[0]["val_loss"] == pytest.approx(start_val, abs=1e-5)
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(evals) == 3 and min(evals[1:]) < evals[0]
    # A fresh schedule: warmup from zero at the preset's LR, not the pretraining's.
    first_logged = next(r for r in rows if "train_loss" in r)
    assert 0 < first_logged["lr"] <= PRESETS["finetune"]["lr"]
    last = checkpoint.load(out / "last.pt")
    assert last.training is not None and last.training.step == 40
    started = pretrained / "best.pt"
    assert last.init_from == {"path": str(started), "sha256": hashlib.sha256(started.read_bytes()).hexdigest()}
    assert checkpoint.load(out / "best.pt").init_from == last.init_from
    assert last.model_config == checkpoint.load(started).model_config  # the shape is the checkpoint's
    assert last.train_settings.init_from == str(pretrained)
    info = microgpt("info", out, env={"COLUMNS": "200"})
    assert f"started from  │ {started} (sha256 {last.init_from['sha256'][:12]})" in info.stdout
    info_json = json.loads(microgpt("info", out / "last.pt", "--json").stdout)
    assert info_json["init_from"] == last.init_from
    # And it stays an ordinary checkpoint: generate and eval take it.
    assert microgpt("generate", "--checkpoint", out, "--prompt", "ROMEO:", "--length", "5").stdout.startswith("ROMEO:")


def test_context_may_shorten_and_dropout_may_change(imported: Path, small_gpt2_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # An LR far below float32's resolution: the saved weights are the start's, to the bit.
    cfg = TrainConfig(data=str(small_gpt2_data), out=str(out), init_from=str(imported), max_steps=1, lr=1e-30,
                      eval_tokens=500)
    train(ModelConfig(context=16, dropout=0.2), cfg, given={"context", "dropout", "init_from"})
    start, saved = checkpoint.load(imported), checkpoint.load(out / "last.pt")
    assert saved.model_config.context == 16 and saved.model_config.dropout == 0.2
    assert saved.model["pos_emb.weight"].shape[0] == 16
    for name, tensor in start.model.items():
        expected = tensor[:16] if name == "pos_emb.weight" else tensor
        assert torch.equal(saved.model[name], expected), name


def test_a_finetune_resumes_exactly(pretrained: Path, small_gpt2_data: Path, tmp_path: Path) -> None:
    def settings(out: Path) -> TrainConfig:
        return TrainConfig(data=str(small_gpt2_data), out=str(out), init_from=str(pretrained), max_steps=8, lr=1e-3,
                           warmup_steps=2, eval_interval=4, eval_tokens=500, batch_size=4)

    model = ModelConfig(context=32, dropout=0.1)  # dropout too: its masks must replay on resume
    given = {"context", "dropout", "init_from"}
    train(model, settings(tmp_path / "whole"), given=given)

    def interrupt_at_step_3(event: Event) -> None:
        if isinstance(event, StepDone) and event.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: the loop saves last.pt and stops

    with pytest.raises(Interrupted):
        train(model, settings(tmp_path / "cut"), given=given, on_event=interrupt_at_step_3)
    assert checkpoint.load(tmp_path / "cut" / "last.pt").step == 3
    train(model, settings(tmp_path / "cut"), resume=True, given=set())
    whole, resumed = checkpoint.load(tmp_path / "whole" / "last.pt"), checkpoint.load(tmp_path / "cut" / "last.pt")
    assert resumed.init_from == whole.init_from and resumed.step == 8
    assert all(torch.equal(whole.model[k], resumed.model[k]) for k in whole.model)


@pytest.mark.parametrize(("args", "fragments"), [
    (["--n-layer", "4", "--n-embed", "64"],
     ["--n-embed 64 (the checkpoint has 40)", "--n-layer 4 (the checkpoint has 2)", "takes the model's shape from it"]),
    (["--activation", "relu"], ["--activation 'relu' (the checkpoint has 'gelu')"]),
    (["--context", "64"], ["--context 64 is longer than --init-from's 48", "never lengthened"]),
])
def test_flags_that_contradict_the_checkpoint_are_refused(args: list[str], fragments: list[str], imported: Path,
                                                          small_gpt2_data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "train", "--init-from", imported, "--data", small_gpt2_data,
                           "--out", tmp_path / "run", *args)
    assert_one_error_line(code, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_another_tokenizer_missing_or_damaged_start_are_refused(
        imported: Path, small_gpt2_data: Path, small_char_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    def refused(init_from: Path, data: Path, *fragments: str) -> None:
        code, _, err = run_cli(capsys, "train", "--init-from", init_from, "--data", data, "--out", tmp_path / "run")
        assert_one_error_line(code, err, *fragments)
        assert not (tmp_path / "run").exists()

    refused(imported, small_char_data, "prepared with tokenizer char", f"--init-from {imported} uses gpt2",
            "microgpt prepare --tokenizer gpt2")
    refused(tmp_path / "missing.pt", small_gpt2_data, f"--init-from {tmp_path / 'missing.pt'} does not exist")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", small_gpt2_data, "no checkpoint in")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(imported.read_bytes()[:5000])
    refused(truncated, small_gpt2_data, "truncated")


def test_resume_cannot_switch_the_start(pretrained: Path, imported: Path, small_gpt2_data: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "train", "--resume", "--data", small_gpt2_data, "--out", pretrained, "--init-from",
                           pretrained / "last.pt")
    assert_one_error_line(code, err, "cannot change --init-from", "on resume")


def test_a_presets_model_shape_gives_way_to_the_checkpoint() -> None:
    model, _ = resolve("cpu", {"init_from": "gpt2.pt"})
    assert model == {"dropout": PRESETS["cpu"]["dropout"]}
    model, _ = resolve("cpu", {"init_from": "gpt2.pt", "context": 32})
    assert model == {"dropout": PRESETS["cpu"]["dropout"], "context": 32}
    assert resolve("cpu", {})[0]["n_layer"] == PRESETS["cpu"]["n_layer"]
    with pytest.raises(InvalidSetting):
        resolve("nonesuch", {"init_from": "gpt2.pt"})


def test_the_readmes_fine_tuning_commands_run_with_a_local_gpt2(tmp_path: Path) -> None:
    """The README's walk-through as written, with a tiny local GPT-2 in place of the download and
    seconds-long training: the one command that needs the network is the only one changed."""
    from test_readme import README, read_blocks

    block = next(b for b in read_blocks(README.read_text(encoding="utf-8")) if "--init-from gpt2.pt" in b.code)
    commands = [command.text for command in block.commands()]
    assert commands[0] == "microgpt import gpt2 --out gpt2.pt", commands
    hf_gpt2(tmp_path / "local-gpt2")
    (tmp_path / "input.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    short = {"train": " --context 32 --batch-size 8 --max-steps 10 --eval-interval 5 --eval-tokens 2000",
             "generate": " --length 10"}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        command = command.replace("import gpt2 ", "import local-gpt2 ") + short.get(command.split()[1], "")
        run = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0 and "Traceback" not in run.stderr, (command, run.stderr)
    assert run.stdout.startswith("ROMEO:") and len(run.stdout) > len("ROMEO:")
    assert checkpoint.load(tmp_path / "finetuned" / "best.pt").init_from["path"] == "gpt2.pt"


@pytest.mark.parametrize("forged", [{"path": 5, "sha256": "ab"}, {"path": "a.pt"}, {"sha256": "ab", "x": "y"}])
def test_a_forged_init_from_record_is_refused(forged: dict, imported: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    state = torch.load(imported, weights_only=True)
    state["init_from"] = forged
    torch.save(state, tmp_path / "forged.pt")
    code, _, err = run_cli(capsys, "info", tmp_path / "forged.pt")
    assert_one_error_line(code, err, "not a valid microgpt checkpoint", "init_from must hold the path and sha256")
