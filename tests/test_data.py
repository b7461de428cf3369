"""`prepare`: data dirs from any text, streamed in chunks whose ids equal encoding the text whole."""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tiktoken_ext.openai_public as openai_public

from microgpt_cli import cli
from microgpt_cli.data import tokenizer as T
from microgpt_cli.data.dataprep import _read_chunks, prepare
from microgpt_cli.data.dataset import data_fingerprint, open_split, read_meta
from microgpt_cli.errors import MicroGPTError

from clitools import assert_one_error_line as one_error_line
from clitools import microgpt, run_cli

# Pieces that stress every split pattern at a chunk boundary: blank lines, CRLF, trailing and
# leading whitespace, Unicode spaces and line separators, "/" after a newline (o200k), CJK, emoji.
PIECES = ["the", "King", "said", "42", "1999", " ", "  ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", ".", ",",
          "!\n", "'s", "'ll", "/", "\n/", "é", "naïve", "中文", "。", "\u3000", "\u00a0", "\u2028", "--", "    ",
          "<|endoftext|>", "😀", "x/y"]


def tricky_text(chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choices(PIECES, k=chars // 3))[:chars]


def splits(out: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    meta = read_meta(out)
    return meta, np.asarray(open_split(out, "train", meta)), np.asarray(open_split(out, "val", meta))


def leftovers(parent: Path) -> list[str]:
    """Hidden temp or old dirs that prepare should never leave behind."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# --- the library -----------------------------------------------------------------------------


def test_char_on_shakespeare_is_nanogpt_like_and_lossless(shakespeare: Path, tmp_path: Path) -> None:
    text = shakespeare.read_text(encoding="utf-8")
    seen: list[int] = []
    totals: list[int] = []
    meta = prepare([shakespeare], tmp_path / "data", tokenizer="char", on_progress=seen.append, on_total=totals.append)
    meta_again, train, val = splits(tmp_path / "data")
    assert meta == meta_again
    assert meta["vocab_size"] == 65 and meta["dtype"] == "uint16" and train.dtype == np.uint16
    assert abs(len(train) - 1_003_854) < 100 and len(train) + len(val) == len(text)  # ~90/10 cut at a line
    tok = T.from_spec(meta["tokenizer"])
    assert tok.decode(train) + tok.decode(val) == text and tok.decode(val).startswith(text[len(train):len(train) + 1])
    assert text[len(train) - 1] == "\n"
    assert meta["splits"] == {"train": {"tokens": len(train), "bytes": len(train)},
                              "val": {"tokens": len(val), "bytes": len(val)}}
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert meta["inputs"] == [{"path": str(shakespeare), "sha256": digest, "bytes": len(text)}]
    assert meta["version"] == 1 and meta["val_fraction"] == 0.1 and meta["chars_per_token"] == 1.0
    assert meta["seconds"] >= 0
    # Progress counts the input's bytes (1.1 MB, not 2.2): each of the two passes (the vocabulary,
    # then the ids) counts half.
    assert totals == [len(text)] and seen[-1] == len(text) and seen == sorted(seen) and len(text) // 2 in seen
    assert data_fingerprint(meta)["inputs"] == [meta["inputs"][0]["sha256"]]
    assert leftovers(tmp_path) == []


def test_gpt2_ids_equal_whole_text_encoding_across_many_chunks(shakespeare: Path, tmp_path: Path) -> None:
    text = shakespeare.read_text(encoding="utf-8")
    meta = prepare([shakespeare], tmp_path / "data", chunk_bytes=4096)  # ~270 chunk boundaries
    _, train, val = splits(tmp_path / "data")
    cut = meta["splits"]["train"]["bytes"]
    tok = T.named("gpt2")
    assert meta["tokenizer"] == {"kind": "gpt2"} and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert train.tolist() == tok.encode(text[:cut]) and val.tolist() == tok.encode(text[cut:])
    assert meta["chars_per_token"] == pytest.approx(len(text) / (len(train) + len(val)), abs=1e-3)


def test_bpe_has_the_asked_vocab_and_round_trips(shakespeare: Path, tmp_path: Path) -> None:
    source = tmp_path / "small.txt"
    source.write_text(shakespeare.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    meta = prepare([source], tmp_path / "data", tokenizer="bpe", vocab_size=400)
    _, train, val = splits(tmp_path / "data")
    tok = T.from_spec(meta["tokenizer"])
    assert meta["vocab_size"] == tok.vocab_size == 400 and max(train.max(), val.max()) < 400
    assert tok.decode(np.concatenate([train, val]).tolist()) == source.read_text(encoding="utf-8")
    with pytest.raises(MicroGPTError, match="only has enough distinct byte pairs"):
        prepare([source], tmp_path / "big", tokenizer="bpe", vocab_size=200_000)


def split_patterns(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The regexes tiktoken uses for its encodings, read from tiktoken itself (without downloading
    the vocabularies that come with them)."""
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    return {"gpt2": openai_public.r50k_pat_str, "cl100k": openai_public.cl100k_base()["pat_str"],
            "o200k": openai_public.o200k_base()["pat_str"]}


def test_chunk_cuts_never_change_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    text = tricky_text(60_000)
    data = text.encode("utf-8")
    merges = T.train_bpe([text], 600)  # learns merges of whitespace, newlines and punctuation runs
    tokenizers = {"gpt2": T.named("gpt2"), "rustbpe": merges}
    for name, pattern in split_patterns(monkeypatch).items():
        tokenizers[name + " pattern"] = T.from_spec({**merges.spec, "pattern": pattern})
    # The test has teeth: cutting after any newline does change ids.
    assert T.named("gpt2").encode("a\n\n") + T.named("gpt2").encode("b") != T.named("gpt2").encode("a\n\nb")

    chunks = [raw for _, raw in _read_chunks(io.BytesIO(data), 0, len(data), 64, "tricky")]
    assert b"".join(chunks) == data and len(chunks) > 200
    texts = [raw.decode("utf-8") for raw in chunks]  # never splits a character
    for name, tok in tokenizers.items():
        assert np.concatenate(tok.encode_batch(texts, num_threads=2)).tolist() == tok.encode(text), name


def test_crlf_and_unicode_lines_are_cut_between_words(tmp_path: Path) -> None:
    lines = [f"line {i} of the file, naïve 日本\r\n" for i in range(2000)]
    data = "".join(lines).encode("utf-8")
    chunks = [raw for _, raw in _read_chunks(io.BytesIO(data), 0, len(data), 256, "crlf")]
    assert len(chunks) > 100 and all(len(c) < 2 * 256 for c in chunks)
    tok = T.named("gpt2")
    assert sum((tok.encode(c.decode()) for c in chunks), []) == tok.encode(data.decode())


def test_large_input_streams_with_the_same_ids(shakespeare: Path, tmp_path: Path) -> None:
    text = shakespeare.read_text(encoding="utf-8") * 16  # ~18 MB: ~16 default chunks for train
    big = tmp_path / "big.txt"
    big.write_text(text, encoding="utf-8")
    meta = prepare([big], tmp_path / "data")
    _, train, val = splits(tmp_path / "data")
    cut = meta["splits"]["train"]["bytes"]
    tok = T.named("gpt2")
    assert len(train) + len(val) == 16 * len(tok.encode(text[: len(text) // 16]))
    assert np.array_equal(train, tok.encode_array(text[:cut])) and np.array_equal(val, tok.encode_array(text[cut:]))


def test_uint32_when_the_vocabulary_needs_it(tmp_path: Path) -> None:
    chars = [chr(c) for c in [*range(0x4E00, 0xA000), *range(0x3400, 0x4DC0), *range(0x20000, 0x2A6E0)]]
    random.Random(0).shuffle(chars)
    text = "\n".join("".join(chars[i : i + 100]) for i in range(0, len(chars), 100)) + "\n"
    source = tmp_path / "many.txt"
    source.write_text(text, encoding="utf-8")
    meta = prepare([source], tmp_path / "data", tokenizer="char")
    _, train, val = splits(tmp_path / "data")
    assert meta["vocab_size"] == len(set(text)) > 65536 and meta["dtype"] == "uint32" and train.dtype == np.uint32
    assert T.from_spec(meta["tokenizer"]).decode(np.concatenate([train, val]).tolist()) == text


def test_each_input_gives_its_tail_to_val_and_directories_are_walked(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / ".git").mkdir()
    a = "".join(f"alpha line {i}\n" for i in range(100))
    b = "".join(f"beta line {i}\n" for i in range(100))
    (corpus / "b.txt").write_text(b, encoding="utf-8")
    (corpus / "sub" / "a.md").write_text(a, encoding="utf-8")
    (corpus / ".hidden.txt").write_text("hidden\n", encoding="utf-8")
    (corpus / ".git" / "config").write_text("[core]\n", encoding="utf-8")
    (corpus / "image.png").write_bytes(b"\x89PNG\x00\x00binary")
    (corpus / "empty.txt").write_bytes(b"")
    meta = prepare([corpus], tmp_path / "data", tokenizer="char", val_fraction=0.2)
    _, train, val = splits(tmp_path / "data")
    tok = T.from_spec(meta["tokenizer"])
    assert [i["path"] for i in meta["inputs"]] == [str(corpus / n) for n in ("b.txt", "empty.txt", "sub/a.md")]
    b_cut, a_cut = (t.index("\n", int(0.8 * len(t))) + 1 for t in (b, a))  # the next line start
    assert tok.decode(train) == b[:b_cut] + a[:a_cut] and tok.decode(val) == b[b_cut:] + a[a_cut:]


def test_errors_replace_accepts_invalid_utf8(tmp_path: Path) -> None:
    source = tmp_path / "latin1.txt"
    source.write_bytes("Grüße aus Köln\n".encode("latin-1") * 20)
    with pytest.raises(MicroGPTError, match=r"latin1.txt is not valid UTF-8 \(byte offset 2\)"):
        prepare([source], tmp_path / "data")
    meta = prepare([source], tmp_path / "data", tokenizer="char", errors="replace")
    _, train, val = splits(tmp_path / "data")
    text = source.read_bytes().decode("utf-8", "replace")
    assert T.from_spec(meta["tokenizer"]).decode(np.concatenate([train, val]).tolist()) == text
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == len(text.encode("utf-8"))


def test_a_failure_midway_leaves_nothing_and_keeps_the_old_dir(tmp_path: Path) -> None:
    source = tmp_path / "late.txt"
    source.write_bytes(b"good line of text\n" * 20_000 + b"bad \xff byte\n")
    out = tmp_path / "data"
    with pytest.raises(MicroGPTError, match="late.txt is not valid UTF-8"):
        prepare([source], out, chunk_bytes=4096)
    assert not out.exists() and leftovers(tmp_path) == []
    out.mkdir()
    (out / "meta.json").write_text("old", encoding="utf-8")
    with pytest.raises(MicroGPTError, match="not valid UTF-8"):
        prepare([source], out, force=True, chunk_bytes=4096)
    assert [p.name for p in out.iterdir()] == ["meta.json"] and leftovers(tmp_path) == []


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_end_to_end_with_stdin_directory_and_force(
    shakespeare: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = shakespeare.read_text(encoding="utf-8")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text("Alpha beta gamma.\n" * 50, encoding="utf-8")
    run = microgpt("prepare", "-", "docs", "--tokenizer", "char", cwd=tmp_path, stdin=text)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and "train tokens" in run.stderr and "65" in run.stderr
    meta, train, val = splits(tmp_path / "data")  # the default --out
    assert [i["path"] for i in meta["inputs"]] == ["-", str(Path("docs") / "one.txt")]
    assert meta["inputs"][0]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert len(train) + len(val) == len(text) + 50 * 18
    assert sorted(os.listdir(tmp_path / "data")) == ["meta.json", "train.bin", "val.bin"]

    monkeypatch.chdir(tmp_path)  # the same entry point in-process, sparing a second torch import
    with pytest.raises(SystemExit) as exited:
        cli.main(["prepare", str(shakespeare), "--force", "--val-fraction", "0.5"])
    assert exited.value.code == 0, capsys.readouterr().err
    meta, train, val = splits(tmp_path / "data")
    assert meta["tokenizer"] == {"kind": "gpt2"} and meta["val_fraction"] == 0.5
    assert abs(len(train) - len(val)) < 0.1 * len(val)
    assert leftovers(tmp_path) == []


def test_help_documents_every_option(tmp_path: Path) -> None:
    run = microgpt("prepare", "--help", cwd=tmp_path)
    out = run.stdout
    for option in ("--out", "--tokenizer", "--vocab-size", "--val-fraction", "--force", "--errors"):
        assert option in out
    assert "default: data" in out and "default: gpt2" in out and "default: 0.1" in out and "4096" in out


BAD_INPUTS = {  # name: (arguments, a fragment of the one error line)
    "missing path": (["nope.txt"], "nope.txt does not exist"),
    "empty file": (["empty.txt"], "input is empty"),
    "whitespace only": (["blank.txt"], "only whitespace"),
    "no text files in dir": (["nothing"], "has no text files"),
    "binary": (["binary.txt"], "binary.txt looks binary (NUL byte at offset 100)"),
    "invalid utf-8": (["latin1.txt"], "latin1.txt is not valid UTF-8 (byte offset 8)"),
    "unknown tokenizer": (["ok.txt", "--tokenizer", "nope"], "unknown tokenizer 'nope'"),
    "val fraction 0": (["ok.txt", "--val-fraction", "0"], "--val-fraction"),
    "val fraction 1.5": (["ok.txt", "--val-fraction", "1.5"], "--val-fraction"),
    "bpe vocab too small": (["ok.txt", "--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size"),
    "vocab size without bpe": (["ok.txt", "--vocab-size", "1000"], "--vocab-size only applies"),
    "bad errors mode": (["ok.txt", "--errors", "ignore"], "--errors"),
    "output exists": (["ok.txt", "--out", "exists"], "exists already exists; pass --force"),
    "too small to split": (["tiny.txt", "--tokenizer", "char"], "too small"),
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_text(" \n\t\n  \n" * 100, encoding="utf-8")
    (root / "nothing").mkdir()
    (root / "nothing" / ".hidden.txt").write_text("hidden text\n", encoding="utf-8")
    (root / "nothing" / "a.bin").write_bytes(b"\x00\x01\x02")
    (root / "binary.txt").write_bytes(b"some text\n" * 10 + b"\x00\x01\x02\x03")
    (root / "latin1.txt").write_bytes("hello\nGrüße\n".encode("latin-1"))
    (root / "tiny.txt").write_text("hi\n", encoding="utf-8")
    (root / "ok.txt").write_text("Some perfectly fine text.\n" * 40, encoding="utf-8")
    (root / "exists").mkdir()
    (root / "exists" / "keep.txt").write_text("old", encoding="utf-8")
    return root


def assert_one_error_line(code: int, stdout: str, stderr: str, fragment: str, root: Path) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0 and stdout == "" and "Traceback" not in stderr, stderr
    # On a slow machine a progress line ("[00:05] prepare data: 50% ...") may come first.
    assert lines[-1].startswith("error:") and fragment in lines[-1], stderr
    assert all(line.startswith("[") for line in lines[:-1]), stderr
    assert not (root / "data").exists() and leftovers(root) == []
    assert [p.name for p in (root / "exists").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_writes_nothing(
    name: str, bad_inputs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process through the same entry point as the `microgpt` script: a subprocess per case
    # would spend ~3 s importing torch each time (see the subprocess test below).
    args, fragment = BAD_INPUTS[name]
    monkeypatch.chdir(bad_inputs)
    with pytest.raises(SystemExit) as exited:
        cli.main(["prepare", *args])
    out, err = capsys.readouterr()
    assert_one_error_line(int(exited.value.code or 0), out, err, fragment, bad_inputs)


def test_bad_input_in_a_real_process_is_one_clear_line(bad_inputs: Path) -> None:
    names = ["invalid utf-8", "output exists"]  # one found while streaming, one before any work
    with ThreadPoolExecutor(len(names)) as pool:
        runs = list(pool.map(lambda name: microgpt("prepare", *BAD_INPUTS[name][0], cwd=bad_inputs, check=False),
                             names))
    for name, run in zip(names, runs):
        assert_one_error_line(run.returncode, run.stdout, run.stderr, BAD_INPUTS[name][1], bad_inputs)


def interrupt_midway(workdir: Path, sig: int) -> subprocess.CompletedProcess[bytes]:
    """Run `prepare big.txt --force` in `workdir` and send `sig` once tokens are being written."""
    args = [sys.executable, "-m", "microgpt_cli", "prepare", "big.txt", "--force"]
    proc = subprocess.Popen(args, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in workdir.glob(".data.tmp-*/train.bin")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def test_ctrl_c_or_kill_leaves_the_old_dir_and_no_temp_dir(shakespeare: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C and SIGTERM clean up at once; what kill -9 leaves (a temp dir of megabytes) goes at
    the next prepare of that dir."""
    signals = {"ctrl-c": signal.SIGINT, "kill": signal.SIGTERM, "kill -9": signal.SIGKILL}
    for name in signals:
        (tmp_path / name / "data").mkdir(parents=True)
        (tmp_path / name / "data" / "meta.json").write_text("old", encoding="utf-8")
        (tmp_path / name / "big.txt").write_bytes(shakespeare.read_bytes() * 30)
    with ThreadPoolExecutor(len(signals)) as pool:  # all at once: each spends seconds importing torch
        runs = dict(zip(signals, pool.map(interrupt_midway, [tmp_path / n for n in signals], signals.values())))
    for name, run in runs.items():
        assert [p.name for p in (tmp_path / name / "data").iterdir()] == ["meta.json"], name
        if name == "kill -9":
            assert run.returncode == -signal.SIGKILL and leftovers(tmp_path / name), name
            continue
        assert run.returncode == 130 and b"Traceback" not in run.stderr, (name, run.stderr)
        last = run.stderr.decode().strip().splitlines()[-1]
        assert last == "stopped: prepare was interrupted; nothing was written: data is as it was", (name, last)
        assert leftovers(tmp_path / name) == [], name
    monkeypatch.chdir(tmp_path / "kill -9")
    (tmp_path / "kill -9" / "small.txt").write_text("Alpha beta gamma.\n" * 50, encoding="utf-8")
    code, _, err = run_cli(capsys, "prepare", "small.txt", "--tokenizer", "char", "--force")
    assert code == 0, err
    assert leftovers(tmp_path / "kill -9") == [] and splits(tmp_path / "kill -9" / "data")[0]["vocab_size"] == 13


def test_force_replaces_only_a_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """--force replaced whatever --out named: the corpus itself, a checkpoint, a run dir, a dir of notes."""
    monkeypatch.chdir(tmp_path)
    Path("corpus.txt").write_text("Alpha beta gamma.\n" * 50, encoding="utf-8")
    Path("model.pt").write_bytes(b"PK\x03\x04 weights")
    for directory, files in {"run": ["best.pt", "metrics.jsonl"], "notes": ["meta.json", "todo.txt"],
                             "empty": [], "data": ["meta.json", "train.bin", "val.bin"]}.items():
        Path(directory).mkdir()
        for name in files:
            (Path(directory) / name).write_text(f"{directory} {name}", encoding="utf-8")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out, fragment in (("corpus.txt", "corpus.txt is a file, not a data dir"), ("model.pt", "is a file"),
                          ("run", "run holds best.pt, metrics.jsonl: it is not a data dir"),
                          ("notes", "notes holds todo.txt: it is not a data dir made by `microgpt prepare`")):
        code, _, err = run_cli(capsys, "prepare", "corpus.txt", "--tokenizer", "char", "--out", out, "--force")
        one_error_line(code, err, fragment)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before and leftovers(tmp_path) == []
    for out in ("empty", "data"):  # what prepare makes, or nothing at all, is replaced
        code, _, err = run_cli(capsys, "prepare", "corpus.txt", "--tokenizer", "char", "--out", out, "--force")
        assert code == 0, err
        assert splits(Path(out))[0]["vocab_size"] == 13


def test_the_old_dir_a_kill_left_moved_aside_is_put_back(tmp_path: Path) -> None:
    """A kill between --force's two renames leaves the old data dir under a hidden name and no
    data dir: the next prepare puts it back before anything else."""
    source = tmp_path / "text.txt"
    source.write_text("Alpha beta gamma.\n" * 50, encoding="utf-8")
    old = tmp_path / ".data.old-0123abcd"
    prepare([source], old, tokenizer="char")
    (tmp_path / ".data.tmp-89abcdef").mkdir()  # the new one, half-written
    with pytest.raises(MicroGPTError, match="data already exists"):
        prepare([source], tmp_path / "data")
    assert splits(tmp_path / "data")[0]["vocab_size"] == 13 and leftovers(tmp_path) == []


def test_each_epoch_shifts_its_windows_by_its_own_random_offset() -> None:
    """Windows start at offset + k * context, the offset drawn per epoch: a split of 1,000 tokens
    with context 10 trains on every alignment of the text over the epochs, not only on k * 10."""
    from microgpt_cli.data.dataset import Batches

    tokens = np.arange(1000, dtype=np.uint16)  # each token is its position
    batches = Batches(tokens, context=10, batch_size=7, seed=3)
    offsets = []
    for epoch in range(8):
        starts = np.concatenate([batches.get(epoch * batches.per_epoch + i)[0][:, 0]
                                 for i in range(batches.per_epoch)]).astype(int)
        assert len(set(starts % 10)) == 1 and len(set(starts)) == len(starts)  # one shift, no window twice
        x, y = batches.get(epoch * batches.per_epoch)
        assert np.array_equal(y, x + 1) and starts.max() + 11 <= len(tokens)
        offsets.append(int(starts[0] % 10))
    assert len(set(offsets)) > 1 and set(offsets) != {0}, offsets
