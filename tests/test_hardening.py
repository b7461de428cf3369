"""Regression tests for bad input, faults and silent mix-ups found by trying microgpt as a user
would: each ends in one clear line (or a correct result), never a traceback, and loses nothing
already on disk. Most run in-process through the CLI's entry point; those that need a second
process or a signal use real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from microgpt_cli.io import checkpoint

from clitools import assert_clean_error, assert_one_error_line, microgpt, run_cli
from conftest import TINY_TEXT

TINY = ["--n-layer", "1", "--n-embed", "32", "--n-head", "2", "--context", "16", "--batch-size", "4",
        "--log-interval", "5", "--eval-tokens", "200", "--device", "cpu"]


def corrupt(data_dir: Path, name: str, change: str) -> Path:
    """A copy of `data_dir` with one file damaged as `change` says."""
    bad = data_dir.parent / f"bad-{change}"
    shutil.copytree(data_dir, bad)
    meta = json.loads((bad / "meta.json").read_text())
    if change == "odd-bytes":
        with open(bad / name, "ab") as f:
            f.write(b"\x01")
    elif change == "id-past-vocab":
        ids = np.fromfile(bad / name, dtype="<u2")
        ids[3] = meta["vocab_size"] + 7
        ids.tofile(bad / name)
    elif change in ("dtype", "vocab-text", "vocab-huge", "vocab-zero", "vocab-mismatch", "version"):
        meta.update({"dtype": {"dtype": "float32"}, "vocab-text": {"vocab_size": "lots"},
                     "vocab-huge": {"vocab_size": 10**12}, "vocab-zero": {"vocab_size": 0},
                     "vocab-mismatch": {"vocab_size": meta["vocab_size"] + 5}, "version": {"version": 99}}[change])
        (bad / "meta.json").write_text(json.dumps(meta))
    elif change == "not-json":
        (bad / "meta.json").write_text("{not json")
    return bad


# --- corrupt data dirs -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "change", "fragment"), [
    ("train.bin", "odd-bytes", "not a whole number of uint16 ids"),
    ("val.bin", "odd-bytes", "val.bin has"),
    ("val.bin", "id-past-vocab", "token id"),
    ("train.bin", "id-past-vocab", "outside the vocabulary"),
    ("meta.json", "dtype", "dtype 'float32'"),
    ("meta.json", "vocab-text", "vocab_size 'lots'"),
    ("meta.json", "vocab-huge", "vocab_size 1000000000000"),
    ("meta.json", "vocab-zero", "vocab_size 0"),
    ("meta.json", "vocab-mismatch", "its tokenizer has"),
    ("meta.json", "version", "version 99"),
    ("meta.json", "not-json", "not readable JSON"),
])
def test_corrupt_data_is_refused_by_info_train_and_eval(name: str, change: str, fragment: str, data_dir: Path,
                                                        make_checkpoint, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = corrupt(data_dir, name, change)
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    assert_one_error_line(*run_cli(capsys, "info", bad)[::2], fragment)
    code, _, err = run_cli(capsys, "train", "--data", bad, "--out", tmp_path / "run", *TINY, "--max-steps", "2")
    assert_one_error_line(code, err, fragment)
    assert not (tmp_path / "run" / "last.pt").exists()
    if name != "train.bin":  # eval reads meta.json and val.bin only
        assert_one_error_line(*run_cli(capsys, "eval", "-c", make_checkpoint(), "--data", bad)[::2], fragment)
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before  # nothing rewritten


def test_a_file_where_a_data_dir_belongs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").write_text("not a dir")
    assert_one_error_line(*run_cli(capsys, "train", "--data", tmp_path / "data", *TINY)[::2], "data")


# --- option values ---------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "fragment"), [
    (["--seed", "-1"], "--seed must be between 0"),
    (["--seed", "99999999999999999999999"], "--seed must be between 0"),
    (["--epochs", "inf"], "--epochs must be a finite number"),
    (["--epochs", "nan"], "--epochs must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--time-budget", "-5"], "--time-budget must not be negative"),
    (["--device", "cpu:abc"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    (["--threads", "100000"], "--threads must be between 0 and 1024"),
    (["--n-embed", "30", "--n-head", "4"], "--n-embed (30) must be divisible by --n-head (4)"),
    (["--optimizer", "sgd"], "'--optimizer': 'sgd' is not one of 'adamw', 'muon'"),
])
def test_out_of_range_train_options(args: list[str], fragment: str, data_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "run", *TINY, *args)
    assert_one_error_line(code, err, fragment)
    assert "Value error" not in err  # the parser's pydantic wording is left out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--seed", "-1"], "--seed must be between 0"),
    (["--seed", "99999999999999999999999"], "--seed must be between 0"),
    (["--temperature", "inf"], "--temperature"),
    (["--length", "10000000000000"], "--length must be between 0"),
    (["--device", "cuda:abc"], "--device"),
])
def test_out_of_range_generate_options(args: list[str], fragment: str, make_checkpoint,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "generate", "-c", make_checkpoint(), "--length", "3", *args)
    assert_one_error_line(code, err, fragment)
    assert out == ""


def test_threads_past_the_cap_never_reach_openmp(data_dir: Path, tmp_path: Path) -> None:
    """--threads 100000 used to crash the process with a segfault inside OpenMP."""
    result = microgpt("train", "--data", data_dir, "--out", tmp_path / "run", *TINY, "--threads", "100000",
                      check=False)
    assert result.returncode == 1 and result.stderr.startswith("error: --threads"), result.stderr


# --- eval --text with characters a char vocabulary lacks -------------------------------------


def test_eval_text_names_unknown_characters_and_can_skip_them(make_checkpoint, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "other.txt"
    text.write_text("Hello world.\nThe €uro and the € again: $5\n", encoding="utf-8")  # €, :, $ are not in TINY_TEXT
    ckpt = make_checkpoint()
    code, out, err = run_cli(capsys, "eval", "-c", ckpt, "--text", text)
    line = assert_one_error_line(code, err, str(text), "4 character(s)", "'€' (U+20AC)", "character 17",
                                 "line 2, column 5", "--skip-unknown")
    assert out == "" and line
    code, out, err = run_cli(capsys, "eval", "-c", ckpt, "--text", text, "--skip-unknown", "--json")
    assert code == 0, err
    result = json.loads(out)
    kept = text.read_text(encoding="utf-8")
    for char in "€:$":
        kept = kept.replace(char, "")
    assert result["skipped"] == 4 and result["tokens"] == len(kept) - 1
    code, out, err = run_cli(capsys, "eval", "-c", ckpt, "--text", text, "--skip-unknown")
    assert code == 0 and "characters skipped" in out and " 4 " in out


# --- checkpoints -----------------------------------------------------------------------------


def test_flipped_bytes_in_a_checkpoint_are_refused(make_checkpoint, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    good = make_checkpoint()
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 300] = bytes(b ^ 0x5A for b in data[middle : middle + 300])
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    for command in (["generate", "-c", bad, "--length", "5"], ["info", bad], ["export", "-c", bad, "--out",
                                                                               tmp_path / "x", "-f", "safetensors"]):
        code, out, err = run_cli(capsys, *command)
        assert_one_error_line(code, err, "flipped.pt", "corrupted")
        assert out == ""
    assert not (tmp_path / "x").exists()


def test_a_tokenizer_bigger_than_the_models_vocabulary_is_refused_at_load(
        char_tokenizer, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its ids past the model's rows used to crash a prompt that held one (generate: an IndexError
    traceback; serve: a 500 for an innocent concurrent request and a request that never ended)."""
    from conftest import tiny_model

    bad = tmp_path / "mismatch.pt"
    model = tiny_model(char_tokenizer.vocab_size - 3)
    checkpoint.save(bad, checkpoint.Checkpoint.of(model, char_tokenizer))
    tokens = char_tokenizer.vocab_size
    fragment = f"its tokenizer has {tokens} tokens but its model only {tokens - 3}"
    for command in (["info", bad], ["generate", "-c", bad, "--prompt", "y", "--length", "3"],
                    ["eval", "-c", bad, "--data", data_dir], ["serve", "-c", bad, "--port", "0", "--device", "cpu"]):
        assert_one_error_line(*run_cli(capsys, *command)[::2], "mismatch.pt", fragment)


@pytest.mark.parametrize("pickle_bytes", [
    b"\x80\x02junk",  # struct.error inside the restricted unpickler
    b"j\x01\x02",  # KeyError
    b"\x80\x02]q\x00(K\x01e\x85R.",  # IndexError
])
def test_a_zip_with_valid_checksums_around_junk_pickle_is_refused(pickle_bytes: bytes, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Crafted, not damaged: the zip checks pass, so the junk reaches torch's weights_only unpickler,
    which fails in ways other than UnpicklingError."""
    crafted = tmp_path / "crafted.pt"
    with zipfile.ZipFile(crafted, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_layer": 1, "n_head": 2,
                                                "n_embd": 8, "n_positions": 16}))
    (hf / "pytorch_model.bin").write_bytes(crafted.read_bytes())
    for command, name in ((["info", crafted], "crafted.pt"), (["generate", "-c", crafted], "crafted.pt"),
                          (["import", hf, "--out", tmp_path / "x.pt"], "pytorch_model.bin")):
        code, out, err = run_cli(capsys, *command)
        assert_one_error_line(code, err, name, "corrupted")
        assert out == ""
    assert not (tmp_path / "x.pt").exists()


def test_info_shows_dashes_before_the_first_evaluation(tmp_path: Path, char_tokenizer,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import tiny_model

    model = tiny_model(char_tokenizer.vocab_size)
    training = checkpoint.TrainingState([], 3, 1.5, float("inf"), 1)  # saved before any evaluation
    state = checkpoint.Checkpoint.of(model, char_tokenizer, training=training)
    checkpoint.save(tmp_path / "last.pt", state)
    code, out, err = run_cli(capsys, "info", tmp_path / "last.pt")
    assert code == 0, err
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if line.count("│") == 3}
    assert rows["best val loss"] == "-" and rows["val loss"] == "-" and rows["steps"] == "3"
    assert not {"inf", "nan"} & set(rows.values())
    code, out, err = run_cli(capsys, "info", tmp_path / "last.pt", "--json")
    assert json.loads(out)["training"]["best_val_loss"] is None


# --- the run dir: lock, starting over, resuming, stale temp files ----------------------------


def start_training(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "microgpt_cli", "train", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def small_run(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A finished 10-step run with an evaluation at step 10."""
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", out, *TINY, "--max-steps", "10",
                           "--eval-interval", "10", "--warmup-steps", "0")
    assert code == 0, err
    return out


def files_of(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def test_a_second_train_on_the_same_dir_is_refused_naming_the_first(small_run: Path, data_dir: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    first = start_training("--data", data_dir, "--out", small_run, *TINY, "--resume", "--max-steps", "1000000",
                           "--eval-interval", "1000000", "--log-interval", "1000000")  # it writes nothing meanwhile
    try:
        assert first.stderr is not None
        assert "resuming at step 10" in first.stderr.readline()  # the run has begun, holding the lock
        assert (small_run / ".lock").read_text().strip() == str(first.pid)
        before = files_of(small_run)
        code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", small_run, *TINY, "--force")
        assert_one_error_line(code, err, str(small_run), "in use", f"PID {first.pid}")
        code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", small_run, "--resume")
        assert_one_error_line(code, err, f"PID {first.pid}")
        assert {k: v for k, v in files_of(small_run).items() if k != ".lock"} == \
            {k: v for k, v in before.items() if k != ".lock"}
    finally:
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr
    assert not (small_run / ".lock").exists()  # released and removed with the run


def test_force_then_ctrl_c_before_the_first_evaluation_leaves_no_mix(small_run: Path, data_dir: Path) -> None:
    old = files_of(small_run)
    proc = start_training("--data", data_dir, "--out", small_run, *TINY, "--force", "--max-steps", "1000000",
                          "--eval-interval", "1000000", "--lr", "1e-3")
    assert proc.stderr is not None
    assert "starting" in proc.stderr.readline()  # the run has begun its first step
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("stopped: SIGINT at step"), stderr
    assert not (small_run / "best.pt").exists()  # the old run's best.pt is gone with the rest of it
    last = checkpoint.load(small_run / "last.pt")
    assert last.train_config["lr"] == 1e-3 and last.training is not None
    steps = [json.loads(line)["step"] for line in (small_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == last.step and (small_run / "metrics.jsonl").read_bytes() != \
        old["metrics.jsonl"]
    assert "lr = 0.001" in (small_run / "config.toml").read_text()
    result = microgpt("generate", "-c", small_run, "--length", "3", "--device", "cpu")
    assert "last.pt" in result.stderr  # generate now finds the new run's model, not the old best.pt


def test_force_then_kill_9_before_the_first_save_keeps_the_old_run(small_run: Path, data_dir: Path) -> None:
    old = files_of(small_run)
    proc = start_training("--data", data_dir, "--out", small_run, *TINY, "--force", "--max-steps", "1000000",
                          "--eval-interval", "1000000")
    assert proc.stderr is not None and "starting" in proc.stderr.readline()
    time.sleep(0.5)
    proc.kill()
    proc.communicate(timeout=60)
    # Only the lock file is new: the kernel released the lock with the process; the next run reuses the file.
    assert {k: v for k, v in files_of(small_run).items() if k != ".lock"} == old


def test_a_run_dir_and_a_data_dir_swapped_are_named_as_such(small_run: Path, data_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["generate", "-c", data_dir], ["eval", "-c", data_dir, "--data", data_dir],
                 ["train", "--init-from", data_dir, "--data", data_dir, "--out", tmp_path / "new"]):
        code, _, err = run_cli(capsys, *args)
        assert_one_error_line(code, err, f"{data_dir} is a data dir (from `microgpt prepare`), not a training run")
    for args in (["eval", "-c", small_run, "--data", small_run],
                 ["train", "--data", small_run, "--out", tmp_path / "new"]):
        code, _, err = run_cli(capsys, *args)
        assert_one_error_line(code, err, f"{small_run} holds checkpoints, not prepared data")
    assert not (tmp_path / "new").exists()


def test_a_time_budget_too_short_for_one_step_is_an_error(small_run: Path, data_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # It used to exit 0 saying "the run in out is at step 0", of a run that did not exist.
    before = files_of(small_run)
    for out, flag in ((small_run.parent / "new", "--lr=1e-3"), (small_run, "--force"), (small_run, "--resume")):
        code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", out, *TINY, flag, "--max-steps=20",
                               "--time-budget", "0.5")
        assert_one_error_line(code, err, "--time-budget 0.5 s ran out before the first step", "larger --time-budget")
    assert not (small_run.parent / "new").exists() and files_of(small_run) == before


def test_resume_changes_the_stopping_point_and_lists_changes(small_run: Path, data_dir: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    before = files_of(small_run)
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", small_run, "--resume", "--max-steps", "5")
    assert code == 0 and "nothing to train" in err and "step 10" in err, err
    assert files_of(small_run) == before  # a run with nothing to do touches nothing
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", small_run, "--resume", "--max-steps", "20",
                           "--lr", "0.002")
    assert code == 0, err
    assert "changed on resume: lr 0.003 → 0.002, max_steps 10 → 20" in err
    last = checkpoint.load(small_run / "last.pt")
    assert last.step == 20 and last.train_config["max_steps"] == 20 and last.train_config["lr"] == 0.002
    rows = [json.loads(line) for line in (small_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    # The cosine schedule now spans 20 steps: the LR rose again after step 10, and its last step runs
    # near the floor (0.1 x the new lr).
    assert rows[2]["lr"] > rows[1]["lr"] and rows[-1]["lr"] == pytest.approx(0.002 * 0.1, rel=0.1)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--n-layer", "2"], "--n-layer (the run has 1)"),
    (["--batch-size", "8"], "--batch-size (the run has 4)"),
    (["--seed", "5", "--optimizer", "muon"], "--optimizer (the run has 'adamw'), --seed (the run has 1337)"),
    (["--position", "rope"], "--position"),
])
def test_resume_refuses_settings_it_cannot_change(args: list[str], fragment: str, small_run: Path, data_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    before = files_of(small_run)
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", small_run, "--resume", *args)
    assert_one_error_line(code, err, "cannot change", fragment, "--force")
    assert files_of(small_run) == before


def test_stale_temp_files_are_cleaned_on_the_next_start(small_run: Path, data_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    stale = small_run / ".last.pt.k3j2h1.tmp"  # what a kill -9 during a save leaves
    stale.write_bytes(b"\0" * 1000)
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", small_run, "--resume", "--max-steps", "15")
    assert code == 0, err
    assert not stale.exists() and not [p for p in small_run.iterdir() if p.name.startswith(".")]


# `python -m microgpt_cli` whose files cannot grow past a limit (the first argument): a write past it
# fails with EFBIG (SIGXFSZ ignored), the same failure midway as a full disk, without root.
CAPPED = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
          "hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]; "
          "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv.pop(1)), hard)); "
          "runpy.run_module('microgpt_cli', run_name='__main__', alter_sys=True)")


def capped_microgpt(limit: int, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CAPPED, str(limit), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_a_write_that_fails_midway_is_one_line_and_loses_nothing(data_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # torch.save reports a failed write of a tensor as a RuntimeError raised while the OSError unwinds,
    # and safetensors as its own error type: both were tracebacks. Matrices of 64 KB and more are
    # written past Python's buffer, inside torch, as a real model's are.
    small_run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", small_run, *TINY, "--n-embed", "128",
                           "--max-steps", "10", "--eval-interval", "10")
    assert code == 0, err
    before = files_of(small_run)
    # Room for best.pt (the weights), not for last.pt (weights and optimizer state): its write fails inside torch.
    limit = (len(before["best.pt"]) + len(before["last.pt"])) // 2
    result = capped_microgpt(limit, "train", "--data", data_dir, "--out", small_run, "--resume", "--max-steps", "20")
    assert_clean_error(result, "File too large:", str(small_run / "last.pt"))
    assert files_of(small_run)["last.pt"] == before["last.pt"]  # the last save stays whole: --resume works
    assert checkpoint.load(small_run / "best.pt").step == 20  # written just before last.pt failed, and whole
    assert not [p for p in small_run.iterdir() if p.name.endswith(".tmp")]
    # Room for config.toml, not for the metrics.jsonl lines of every step from 11 on (resuming cuts
    # the file back to step 10's lines); the next save, at step 20, is never reached.
    limit = max(len(before[name]) for name in ("config.toml", "metrics.jsonl")) + 30
    result = capped_microgpt(limit, "train", "--data", data_dir, "--out", small_run, "--resume", "--max-steps", "20",
                             "--log-interval", "1")
    assert_clean_error(result, "File too large:", str(small_run / "metrics.jsonl"))
    for format in ("safetensors", "hf"):
        result = capped_microgpt(20_000, "export", "-c", small_run, "--format", format, "--out", tmp_path / format)
        assert_one_error_line(result.returncode, result.stderr, f"cannot write {tmp_path / format}/model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", "run"])  # no export, no temp dir


def test_run_files_follow_the_umask(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    previous = os.umask(0o027)
    try:
        code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "run", *TINY,
                               "--max-steps", "5", "--eval-interval", "5")
    finally:
        os.umask(previous)
    assert code == 0, err
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    assert set(modes) == {"best.pt", "last.pt", "metrics.jsonl", "config.toml", "loss.png"}
    assert set(modes.values()) == {0o640}, modes


def test_paths_with_brackets_are_shown_as_they_are(data_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs[1]" / "[bold]x"
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", out, *TINY, "--max-steps", "5",
                           "--eval-interval", "5")
    assert code == 0, err
    assert f"settings (saved in {out / 'config.toml'})" in err
    assert table_rows(err)["best checkpoint"] == str(out / "best.pt")
    assert table_rows(err)["resume from"] == str(out / "last.pt")


def table_rows(text: str) -> dict[str, str]:
    """Label -> value of a two-column Rich table, with values folded over several lines joined."""
    rows: dict[str, str] = {}
    label = ""
    for line in text.splitlines():
        cells = line.split("│")
        if len(cells) == 4:
            label = cells[1].strip() or label
            rows[label] = rows.get(label, "") + cells[2].strip()
    return rows


# --- prepare and generate --------------------------------------------------------------------


def test_prepare_refuses_an_input_given_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text(TINY_TEXT)
    os.chdir(tmp_path)
    code, _, err = run_cli(capsys, "prepare", "-", "-", "--out", tmp_path / "d")
    assert_one_error_line(code, err, "input - is given twice")
    code, _, err = run_cli(capsys, "prepare", "a.txt", str(tmp_path / "a.txt"), "--out", tmp_path / "d")
    assert_one_error_line(code, err, "is given twice")
    assert not (tmp_path / "d").exists()


def test_prepare_sample_needs_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "prepare", "--sample", "tinyshakespeare", "--tokenizer", "char", "--out",
                           tmp_path / "d")
    assert code == 0, err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["inputs"][0]["path"] == "sample:tinyshakespeare" and meta["vocab_size"] == 65
    assert meta["inputs"][0]["sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == 1_115_394
    code, _, err = run_cli(capsys, "prepare", "--out", tmp_path / "e")
    assert_one_error_line(code, err, "no input given", "--sample")


def test_ctrl_c_during_generate_says_what_was_written(make_checkpoint) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "microgpt_cli", "generate", "-c", str(make_checkpoint()),
                             "--length", "100000000", "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.read(50)  # generation is under way
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("stopped: generation interrupted after") and "new tokens" in line, stderr


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for signal `sig` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_a_signal_while_the_command_starts_is_one_line() -> None:
    """The CLI's modules (typer, rich, then torch) take a second or more to import: Ctrl-C or a
    SIGTERM in that time printed a KeyboardInterrupt traceback from inside an import. The clock
    starts once microgpt's entry point runs (it catches SIGTERM from then on): what comes before
    is the interpreter's own start-up."""
    for sig, delay in ((signal.SIGINT, 0.0), (signal.SIGINT, 0.1), (signal.SIGINT, 0.3), (signal.SIGTERM, 0.1)):
        proc = subprocess.Popen([sys.executable, "-m", "microgpt_cli", "eval", "-c", "nothing-here.pt"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 15
        while not _catches(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and out == "", (sig, delay, err)
        assert_one_error_line(proc.returncode, err, "interrupted")


# --- help and the Python API -----------------------------------------------------------------


def test_the_public_api_names_functions_even_after_their_modules_load() -> None:
    import importlib

    for module in ("training.loop", "infer.evaluation", "data.dataprep", "data.dataset", "infer.sampling",
                   "io.checkpoint"):
        importlib.import_module(f"microgpt_cli.{module}")
    import microgpt_cli
    from microgpt_cli import evaluate, generate_text, load_checkpoint, prepare, stream_text, train

    assert all(callable(f) and not isinstance(f, type(microgpt_cli))
               for f in (evaluate, generate_text, load_checkpoint, prepare, stream_text, train))


@pytest.fixture(autouse=True)
def _keep_cwd() -> Iterator[None]:
    cwd = os.getcwd()
    yield
    os.chdir(cwd)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
