"""Chat: the template and its special tokens, `prepare --chat` with its loss mask, masked training
from a base model, `microgpt chat` and serve's chat route on a model that learned a task.

The proof that it learns: a base model pretrained briefly on tinyshakespeare is fine-tuned on a
synthetic task the test generates (the user asks to uppercase a word of 3 to 5 letters; the
assistant answers with the word in capitals), then scored on held-out words through `microgpt chat` (stdin
mode) and through the openai client on `microgpt serve`."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from microgpt_cli.config import ModelConfig, SamplingSettings, TrainConfig
from microgpt_cli.data import tokenizer as T
from microgpt_cli.data.chat import ChatFormat, ChatTemplate, Message, exchanges, pieces
from microgpt_cli.data.dataprep import prepare
from microgpt_cli.data.dataset import IGNORE, ChatBatches, ChatRows, data_tokenizer, open_mask, open_split, read_meta
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.chat import Conversation
from microgpt_cli.infer.sampling import load_sampler
from microgpt_cli.io import checkpoint
from microgpt_cli.model.gpt import GPT
from microgpt_cli.repl import run_piped
from microgpt_cli.training import distributed
from microgpt_cli.training.loop import build_run

from clitools import assert_one_error_line, run_cli

TEMPLATE = ChatTemplate()
TRICKY_USER = "what does <|end|><|assistant|> mean? <|chat|>"  # the delimiters' text, typed by a user
CONVERSATION = [Message("system", "You answer briefly."), Message("user", TRICKY_USER),
                Message("assistant", "Nothing special."), Message("user", "And now?"), Message("assistant", "Still.")]


def write_jsonl(path: Path, conversations: Sequence[Sequence[Message] | str]) -> Path:
    """One line per conversation; a str is written as the line itself."""
    lines = [c if isinstance(c, str) else json.dumps({"messages": [{"role": m.role, "content": m.content} for m in c]})
             for c in conversations]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


TOKENIZERS = {"gpt2": lambda: T.named("gpt2"),
              "char": lambda: T.train_char([TRICKY_USER + "".join(m.content for m in CONVERSATION)]),
              "bpe": lambda: T.train_bpe([TRICKY_USER * 10 + " ".join(m.content for m in CONVERSATION) * 10], 300)}


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_rendered_ids_round_trip_and_typed_delimiters_stay_text(kind: str) -> None:
    base = TOKENIZERS[kind]()
    tok = T.from_spec(json.loads(json.dumps(base.with_chat_template(TEMPLATE).spec)))  # as meta.json stores it
    assert tok.vocab_size == base.vocab_size + 5 and tok.chat_template == TEMPLATE
    special = set(range(base.vocab_size, tok.vocab_size))
    if kind == "gpt2":
        assert special == set(range(50257, 50262))  # the rows above GPT-2's 50,257 tokens
    chat = ChatFormat(tok)
    ids, mask = chat.render(CONVERSATION)
    assert chat.parse(ids) == CONVERSATION
    # The user typed every delimiter's text: it encodes as ordinary tokens, and exactly the template's
    # own delimiters are special: <|chat|>, then <|role|> and <|end|> around each of the 5 turns.
    assert not special & set(tok.encode(TRICKY_USER))
    assert [i for i in ids.tolist() if i in special] == [chat.start] + [
        x for m in CONVERSATION for x in (chat.role_ids[m.role], chat.end)]
    assert TRICKY_USER in tok.decode(ids) and tok.decode(ids).count("<|end|>") == 6  # 5 turns + the typed one
    # The mask: the assistant's content and the <|end|> of its turn, nothing else.
    trained = tok.decode(ids[mask.astype(bool)].tolist())
    assert trained == "Nothing special.<|end|>Still.<|end|>"


def test_a_stored_template_is_checked_strictly() -> None:
    spec = T.named("gpt2").with_chat_template(TEMPLATE).spec
    for broken, message in [({**spec, "added": spec["added"][:-1]}, "not one of its added tokens"),
                            ({**spec, "chat_template": {**TEMPLATE.to_dict(), "end": 5}}, "non-empty strings"),
                            ({**spec, "chat_template": {**TEMPLATE.to_dict(), "name": "chatml"}}, "unknown chat"),
                            ({**spec, "added": ["<|x|>", "<|x|>"]}, "distinct")]:
        with pytest.raises(MicroGPTError, match=message):
            T.from_spec(broken)


def test_pieces_keep_whole_exchanges_within_the_room() -> None:
    roles = ["system", "user", "assistant", "user", "assistant", "assistant", "user", "assistant", "user"]
    lengths = [4, 5, 6, 3, 9, 2, 30, 4, 5]
    assert exchanges(roles) == [range(0, 3), range(3, 6), range(6, 8), range(8, 9)]
    cut, dropped = pieces(roles, lengths, 20)
    # (system, user, assistant) = 15 fits; (user, assistant, assistant) = 14 starts a new piece; the third
    # exchange (34 tokens) fits nowhere and is left out; the unanswered user turn at the end trains nothing.
    assert cut == [range(0, 3), range(3, 6)] and dropped == 1
    assert pieces(roles, lengths, 100) == ([range(0, 8)], 0)


def test_prepare_chat_writes_the_mask_and_rows_cut_at_turn_boundaries(tmp_path: Path) -> None:
    long = [Message("user", f"question {i} " * 3) if i % 2 == 0 else Message("assistant", f"answer {i}")
            for i in range(12)]
    source = write_jsonl(tmp_path / "chats.jsonl", [CONVERSATION, long] * 20)
    meta = prepare([source], tmp_path / "data", tokenizer="char", chat=True)
    counts = meta["chat"]["conversations"]
    assert counts["train"] + counts["val"] == 40 and counts["val"] > 0 and meta["chat"]["skipped_lines"] == 0
    tok = data_tokenizer(read_meta(tmp_path / "data"))
    chat = ChatFormat(tok)
    tokens, mask = open_split(tmp_path / "data", "train", meta), open_mask(tmp_path / "data", "train")
    assert int(mask.sum()) == meta["chat"]["trained_tokens"]["train"]
    rows = ChatRows(tokens, mask, tok, context=100)  # shorter than the long conversation (12 turns)
    assert rows.conversations == counts["train"] and rows.dropped == 0
    inputs, targets = rows.get(np.arange(len(rows)))
    assert inputs.shape == (len(rows), 100) and (targets != IGNORE).any(axis=1).all()  # every row trains
    for row_ids, row_targets in zip(inputs, targets, strict=True):
        ids = [*row_ids.tolist(), int(row_targets[-1]) if row_targets[-1] != IGNORE else chat.end]
        starts = [i for i, t in enumerate(ids) if t == chat.start]
        assert starts[0] == 0
        for begin, end in zip(starts, [*starts[1:], None], strict=True):
            piece = ids[begin:end]
            while piece[-1] == chat.end and piece[-2] == chat.end:  # padding after the last piece
                piece.pop()
            messages = chat.parse(piece)  # whole turns only: any cut inside a turn fails to parse
            assert messages[0].role != "assistant" and messages[-1].role == "assistant"
            for i, message in enumerate(messages):
                assert message in CONVERSATION or message in long
                if message.role == "assistant" and i > 0 and messages[i - 1].role != "assistant":
                    source_turns = CONVERSATION if messages[i - 1] in CONVERSATION else long
                    assert source_turns[source_turns.index(message) - 1] == messages[i - 1]  # with its question
    # Every trained target is an assistant token: the loss never sees the user's or system's text.
    assert set(tok.decode(targets[targets != IGNORE].tolist()).replace("<|end|>", "")) <= set(
        "".join(m.content for m in [*CONVERSATION, *long] if m.role == "assistant"))


def test_the_loss_mask_gives_zero_gradient_to_user_and_system_tokens(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "chats.jsonl", [CONVERSATION] * 10)
    prepare([source], tmp_path / "data", tokenizer="char", chat=True)
    meta = read_meta(tmp_path / "data")
    tok = data_tokenizer(meta)
    batches = ChatBatches(ChatRows(open_split(tmp_path / "data", "train", meta), open_mask(tmp_path / "data", "train"),
                                   tok, context=80), batch_size=2, seed=0)
    x, y = (torch.from_numpy(a) for a in batches.get(0))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embed=16, context=80))
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        captured.append(out)

    model.head.register_forward_hook(keep)
    model(x, y).backward()  # the training loss, as the loop computes it
    assert captured[0].grad is not None
    grad = captured[0].grad[..., : tok.vocab_size].abs().sum(-1)  # (B, T): the gradient at each position's logits
    # A position predicts the next token; its logits get gradient exactly when that token is the assistant's,
    # which the roles in the row itself say (walked here independently of the mask file).
    chat = ChatFormat(tok)
    assistant = torch.zeros(y.shape, dtype=torch.bool)
    for b in range(len(x)):
        role = None
        for t, token in enumerate([*x[b, 1:].tolist(), int(y[b, -1])]):  # the token position t predicts
            if token in chat.id_roles:
                role = chat.id_roles[token]
            elif token == chat.start:
                role = None
            else:  # content, or the <|end|> closing a turn (or padding, after an <|end|>)
                assistant[b, t] = role == "assistant"
                role = None if token == chat.end else role
    assert assistant.any() and (~assistant).any()
    assert torch.equal(y != IGNORE, assistant)
    assert (grad[~assistant] == 0).all() and (grad[assistant] > 0).all()


def test_prepare_chat_names_each_malformed_line_and_counts_them(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = ('{"messages": [{"role": "user", "content": "hi"}', '{"messages": [{"role": "bot", "content": "hi"}]}',
           '{"messages": [{"role": "user", "content": "hi"}]}',
           '{"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "yo"}]}',
           '["not", "an", "object"]', "", '{"messages": [{"role": "user", "content": "€"}, '
                                          '{"role": "assistant", "content": "x"}]}')
    source = write_jsonl(tmp_path / "chats.jsonl", [*[CONVERSATION] * 9, *bad, *[CONVERSATION] * 3])
    base = prepare([write_jsonl(tmp_path / "base.jsonl", [CONVERSATION] * 9)], tmp_path / "base", tokenizer="char",
                   chat=True)
    code, _, err = run_cli(capsys, "prepare", source, "--chat", "--tokenizer-from", tmp_path / "base",
                           "--out", tmp_path / "data")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {source}:10: skipped: not valid JSON (Expecting ',' delimiter)",
        f"warning: {source}:11: skipped: message 0 has unknown role 'bot' (use system, user or assistant)",
        f"warning: {source}:12: skipped: it has no assistant turn",
        f"warning: {source}:13: skipped: message 0 content is list, not a string",
        f'warning: {source}:14: skipped: not an object with a "messages" list',
        f"warning: {source}:16: skipped: character '€' (U+20AC) is not in this char tokenizer's vocabulary",
    ]  # line 15 is blank: nothing to report
    assert "malformed lines skipped" in err and "│ 6 │" in err.replace(" ", "").replace("│6│", "│ 6 │")
    meta = read_meta(tmp_path / "data")
    assert meta["chat"]["skipped_lines"] == 6 and meta["tokenizer"] == base["tokenizer"]
    only_bad = write_jsonl(tmp_path / "bad.jsonl", bad[:-1])  # the last is fine in a char vocabulary of its own
    code, _, err = run_cli(capsys, "prepare", only_bad, "--chat", "--tokenizer", "char", "--out", tmp_path / "d2")
    errors = "\n".join(line for line in err.splitlines() if not line.startswith("warning:"))
    assert_one_error_line(code, errors, "no conversation to train on: all 5 non-blank lines are malformed")
    assert not (tmp_path / "d2").exists()
    code, _, err = run_cli(capsys, "prepare", "--sample", "tinyshakespeare", "--chat", "--out", tmp_path / "d3")
    assert_one_error_line(code, err, "--sample is plain text")


def test_fine_tuning_adds_the_template_rows_without_resizing_a_padded_gpt2_vocabulary(tmp_path: Path) -> None:
    """GPT-2's tokenizer with the template: ids 50,257 to 50,261. A model with padded rows (50,304, as
    --preset gpt2 and --preset sft make them) keeps its matrices; an import's 50,257 rows grow. Either
    way the old tokens' rows are the start's, and the new ones start at the mean of those."""
    source = write_jsonl(tmp_path / "chats.jsonl", [CONVERSATION] * 40)
    prepare([source], tmp_path / "data", chat=True)
    tok = T.named("gpt2")
    for pad, start_rows in ((128, 50304), (1, 50257)):
        torch.manual_seed(0)
        base = GPT(ModelConfig(vocab_size=50257, n_layer=1, n_head=2, n_embed=8, context=64, pad_vocab=pad))
        start = tmp_path / f"base{pad}.pt"
        checkpoint.save(start, checkpoint.Checkpoint.of(base, tok))
        assert base.tok_emb.weight.shape[0] == start_rows
        settings = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / f"run{pad}"), init_from=str(start),
                               batch_size=2)
        run = build_run(ModelConfig(pad_vocab=64), settings,
                        resume=False, force=False, world=distributed.World(), given={"init_from", "pad_vocab"})
        weight = run.model.tok_emb.weight.detach()
        assert run.model_config.vocab_size == 50262 and weight.shape[0] == 50304  # 50,304 = 64 * 786
        old = base.tok_emb.weight.detach()[:50257]
        assert torch.equal(weight[:50257], old)
        assert torch.allclose(weight[50257:50262], old.mean(0).expand(5, -1))
        assert run.tokenizer.chat_template == TEMPLATE and run.val_rows is not None


# --- the proof that it learns ------------------------------------------------------------------

SFT_STEPS = 150


def upper_task(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """(question, answer) pairs: "upper abcd" -> "ABCD", for random lowercase words of 3 to 5 letters
    not in `exclude`."""
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))
        if word not in exclude:
            pairs.append((f"upper {word}", word.upper()))
    return pairs


@pytest.fixture(scope="session")
def tuned(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small model pretrained briefly on tinyshakespeare (char), fine-tuned with `--preset sft` on
    3,000 generated conversations; the held-out questions use words it never saw."""
    root = tmp_path_factory.mktemp("sft")
    from microgpt_cli.training.loop import train

    shape = ModelConfig(n_layer=2, n_head=4, n_embed=64, context=48, position="rope", dropout=0.0)
    train(shape, TrainConfig(data=str(char_data), out=str(root / "base"), max_steps=50, eval_interval=50,
                             eval_tokens=2000, batch_size=32, lr=3e-3, warmup_steps=10))
    seen = upper_task(3000, seed=1)
    held_out = upper_task(40, seed=2, exclude=frozenset(q for q, _ in seen))
    source = write_jsonl(root / "chats.jsonl", [[Message("user", q), Message("assistant", a)] for q, a in seen])
    from microgpt_cli.cli import main

    for args in (["prepare", source, "--chat", "--tokenizer-from", root / "base", "--out", root / "data-chat"],
                 # The preset, with an LR for the embeddings and norms (AdamW's part) ten times GPT-2's: this
                 # model is a thousand times smaller. One evaluation, at the end.
                 ["train", "--init-from", root / "base", "--data", root / "data-chat", "--preset", "sft", "--lr", 3e-3,
                  "--max-steps", SFT_STEPS, "--eval-interval", SFT_STEPS, "--batch-size", 16, "--out", root / "chat"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        assert exit_info.value.code == 0
    return {"base": root / "base", "chat": root / "chat", "held_out": held_out}


def chat_rate(replies: list[str], held_out: list[tuple[str, str]]) -> float:
    return sum(reply == answer for reply, (_, answer) in zip(replies, held_out, strict=True)) / len(held_out)


def test_the_tuned_model_answers_held_out_questions_through_microgpt_chat(tuned: dict[str, Any]) -> None:
    """One question per line, /reset between them (each is a new conversation), greedy: the tuned
    model answers most of them exactly and ends its turn (a reply that ran on to --length would not
    equal the answer); the base model, which has no template (a plain transcript), answers none."""
    from clitools import microgpt

    held_out = tuned["held_out"]
    questions = "".join(f"{q}\n/reset\n" for q, _ in held_out)
    result = microgpt("chat", "-c", tuned["chat"], "--temperature", 0, "--length", 12, stdin=questions)
    replies = result.stdout.splitlines()
    assert len(replies) == len(held_out) and "chat template microgpt-chat-1" in result.stderr
    rate = chat_rate(replies, held_out)
    base = Conversation(load_sampler(tuned["base"], device="cpu"), SamplingSettings(length=12, temperature=0))
    base_replies = io.StringIO()
    run_piped(base, io.StringIO(questions), base_replies, pytest.fail)  # what `microgpt chat` runs, in-process
    base_rate = chat_rate(base_replies.getvalue().splitlines(), held_out)
    print(f"held-out answers right: tuned {rate:.0%}, base {base_rate:.0%}")
    assert rate >= 0.8 and base_rate <= 0.05


def test_the_python_api_eval_and_repl_speak_the_same_template(tuned: dict[str, Any]) -> None:
    """chat() gives what `microgpt chat` gives; eval on the chat data scores what training scored (the
    assistant's tokens, in whole conversations); the REPL keeps the history, /reset forgets it,
    /system opens the conversation, and a message the vocabulary cannot encode gets an empty reply
    line and a warning, so that every input line still has its reply line."""
    from microgpt_cli import chat
    from microgpt_cli.infer.evaluation import evaluate

    question, answer = tuned["held_out"][0]
    assert chat(tuned["chat"], [{"role": "user", "content": question}], temperature=0, length=12) == answer
    best = checkpoint.load(tuned["chat"] / "best.pt")
    result = evaluate(tuned["chat"], tuned["chat"].parent / "data-chat", device="cpu")
    assert result.loss == pytest.approx(best.val_loss, abs=1e-4)

    conversation = Conversation(load_sampler(tuned["chat"], device="cpu"), SamplingSettings(length=12, temperature=0))
    out, warnings = io.StringIO(), list[str]()
    lines = [q for q, _ in tuned["held_out"][1:4]]
    run_piped(conversation, io.StringIO("\n".join([*lines, "upper €uro"])), out, warnings.append)
    replies = out.getvalue().split("\n")
    assert len(replies) == 5 and replies[0] == tuned["held_out"][1][1] and replies[3:] == ["", ""]
    # The history holds every exchange, as sent and as answered (the model, trained on single exchanges,
    # may answer differently with earlier ones in its prompt).
    sent = [x for q, a in zip(lines, replies, strict=False) for x in (q, a)]
    assert [m.content for m in conversation.messages] == sent
    assert len(warnings) == 1 and "'€'" in warnings[0]  # the unencodable message did not join the history
    run_piped(conversation, io.StringIO(f"/system be brief\n/reset\n{lines[0]}\n"), out, warnings.append)
    assert [m.content for m in conversation.messages][:1] == [lines[0]] and len(conversation.messages) == 2
    assert conversation.system == "be brief"


def test_chat_data_resumes_exactly_and_shards_like_plain_data(tmp_path: Path) -> None:
    """The chat batches keep train's contract: micro-batch i is a function of i alone (a resumed run
    ends with the weights of an uninterrupted one), and the processes of a DDP run each take their
    slice of the same global batch."""
    from microgpt_cli.training.loop import train

    source = write_jsonl(tmp_path / "chats.jsonl", [CONVERSATION[1:3], CONVERSATION[3:], CONVERSATION] * 30)
    prepare([source], tmp_path / "data", tokenizer="char", chat=True)
    shape = ModelConfig(n_layer=1, n_head=2, n_embed=16, context=64, dropout=0.1)

    def run(out: str, steps: int, resume: bool = False) -> None:
        train(shape, TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / out), max_steps=steps,
                                 eval_interval=2, batch_size=4, warmup_steps=1), resume=resume,
              given={"max_steps"} if resume else None)

    run("straight", 4)
    run("resumed", 2)
    run("resumed", 4, resume=True)
    straight, resumed = (checkpoint.load(tmp_path / name / "last.pt") for name in ("straight", "resumed"))
    assert all(torch.equal(straight.model[k], resumed.model[k]) for k in straight.model)
    assert straight.val_loss == resumed.val_loss

    meta = read_meta(tmp_path / "data")
    rows = ChatRows(open_split(tmp_path / "data", "train", meta), open_mask(tmp_path / "data", "train"),
                    data_tokenizer(meta), context=64)
    whole = ChatBatches(rows, batch_size=4, seed=3)
    ranks = [ChatBatches(rows, batch_size=4, seed=3, rank=r, world=2) for r in range(2)]
    for index in (0, whole.per_epoch + 1):  # the second epoch is shuffled anew, alike everywhere
        x, y = whole.get(index)
        parts = [batches.get(index) for batches in ranks]
        assert np.array_equal(x, np.concatenate([p[0] for p in parts]))
        assert np.array_equal(y, np.concatenate([p[1] for p in parts]))


def test_on_a_terminal_ctrl_c_stops_the_reply_not_the_session(tuned: dict[str, Any]) -> None:
    """`microgpt chat` on a pseudo-terminal: a reply streams (a base model talking on, --length far
    away), SIGINT stops it and the prompt comes back; SIGINT at the prompt does not leave either;
    the conversation goes on, and /quit ends it with status 0."""
    import os
    import pty
    import select
    import signal
    import subprocess
    import sys
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "microgpt_cli", "chat", "-c", str(tuned["base"]), "--length",
                             "100000", "--device", "cpu"], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(text: str) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60
        while text.encode() not in seen:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no {text!r} in {seen[-600:]!r}"
            seen += os.read(master, 65536)
        seen = seen[seen.index(text.encode()) + len(text):]

    try:
        read_until("you> ")
        os.write(master, b"Good morrow\r")
        read_until("model> ")
        read_until("\n")  # a line of the reply has streamed: it is still going
        proc.send_signal(signal.SIGINT)
        read_until("(reply stopped)")
        read_until("you> ")
        # At the prompt: a SIGINT that lands between readline's prompt and its wait for input is only seen
        # at the next one (as for a person, whose key press is never that quick), so send until answered.
        for _ in range(20):
            proc.send_signal(signal.SIGINT)
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                break
        read_until("(Ctrl-D or /quit leaves)")
        os.write(master, b"/system be brief\r")
        read_until("system message set")
        os.write(master, b"/quit\r")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_serve_answers_with_the_template_and_stops_at_the_end_of_the_turn(tuned: dict[str, Any]) -> None:
    """The openai client on `serve`: the held-out questions, sent concurrently (the batch decodes
    them together), answered as `microgpt chat` answers them, each ending with finish_reason "stop"
    at the model's end of turn; /v1/models says the model has a template (the playground reads it)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from microgpt_cli import chat
    from microgpt_cli.serve.server import Service
    from microgpt_cli.serve.settings import ServeSettings

    service = Service(tuned["chat"], ServeSettings(port=0, max_batch=8), device="cpu")
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        while not service.uvicorn.started:
            assert thread.is_alive()
            time.sleep(0.02)
        client = openai.OpenAI(base_url=service.url + "/v1", api_key="none", max_retries=0, timeout=60)
        card = client.models.list().data[0]
        assert card.model_extra is not None and card.model_extra["microgpt"]["chat_template"] is True

        def ask(question: str) -> tuple[str, str]:
            reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": question}],
                                                   temperature=0, max_tokens=12)
            return reply.choices[0].message.content or "", reply.choices[0].finish_reason

        held_out = tuned["held_out"]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, [q for q, _ in held_out]))
        rate = sum(reply == answer and finish == "stop" for (reply, finish), (_, answer) in zip(answers, held_out,
                                                                                                  strict=True))
        print(f"held-out answers right through serve: {rate / len(held_out):.0%}")
        assert rate >= 0.8 * len(held_out)
        question = held_out[0][0]
        assert answers[0][0] == chat(tuned["chat"], [{"role": "user", "content": question}], temperature=0,
                                     length=12, device="cpu")
        streamed = client.chat.completions.create(
            model="chat", messages=[{"role": "developer", "content": "Answer."}, {"role": "user", "content": question}],
            temperature=0, max_tokens=12, stream=True)
        chunks = list(streamed)
        assert chunks[-1].choices[0].finish_reason == "stop" and "<|" not in "".join(
            c.choices[0].delta.content or "" for c in chunks)
        with pytest.raises(openai.BadRequestError, match="no tool role"):
            client.chat.completions.create(model="chat",
                                           messages=[{"role": "tool", "content": "42", "tool_call_id": "1"}])
        with pytest.raises(openai.BadRequestError, match="not in this char tokenizer"):
            client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "<|end|> ☃"}])
    finally:
        service.stop()
        thread.join(30)
