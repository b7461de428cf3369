"""Sampling and text streaming, alone and in batches, on tiny random models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from microgpt_cli.config import InvalidSetting, SamplingSettings
from microgpt_cli.data.tokenizer import Tokenizer, named, train_bpe, train_char
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.engine import sample_next
from microgpt_cli.infer.sampling import Detokenizer, Sampler, generate_text, generate_texts, stream_text
from microgpt_cli.model.gpt import GPT

from conftest import TINY_TEXT, tiny_model

MULTILINGUAL = "Ça va? Grüße, 日本語のテキスト, emoji 🙂🚀 and ñ. "


def uncached_greedy(model: GPT, ids: list[int], length: int) -> list[int]:
    """Greedy decoding the slow way: the whole (cropped) sequence through the model every token."""
    seq = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(length):
            logits = model(seq[:, -model.config.context :])[:, -1]
            seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
    return seq[0, len(ids) :].tolist()


def test_sliding_window_past_context_matches_uncached_greedy_within_first_window(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    context = model.config.context
    prompt = "Hello"
    text = generate_text(model, prompt, 4 * context, char_tokenizer, temperature=0)
    new = char_tokenizer.encode(text)[len(prompt) :]
    assert len(new) == 4 * context
    first_window = context - len(prompt) + 1  # tokens predicted while the whole sequence still fits
    assert new[:first_window] == uncached_greedy(model, char_tokenizer.encode(prompt), first_window)


def test_prompt_longer_than_context(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    prompt = TINY_TEXT[:50]
    text = generate_text(model, prompt, 10, char_tokenizer, temperature=0)
    assert text.startswith(prompt) and len(text) == 60
    # The prompt fills the cache, so only the first new token sees the same window as the uncached model.
    assert char_tokenizer.encode(text[50])[0] == uncached_greedy(model, char_tokenizer.encode(prompt), 1)[0]


def test_same_seed_same_text_and_different_seed_different_text(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    sample = lambda seed: generate_text(model, "The", 40, char_tokenizer, temperature=1.0, top_k=None, seed=seed)
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_greedy_top_k_1_and_tiny_top_p_agree(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    greedy = generate_text(model, "The ", 30, char_tokenizer, temperature=0)
    assert greedy[4:16] == char_tokenizer.decode(uncached_greedy(model, char_tokenizer.encode("The "), 12))
    assert generate_text(model, "The ", 30, char_tokenizer, temperature=1.5, top_k=1, seed=3) == greedy
    assert generate_text(model, "The ", 30, char_tokenizer, temperature=1.5, top_k=None, top_p=1e-6, seed=3) == greedy


def test_top_k_and_top_p_keep_only_the_likeliest_tokens() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: {int(sample_next(logits, 1.0, generators=[g], **kw)) for _ in range(300)}
    assert draw(top_k=2, top_p=1.0) == {1, 3}
    assert draw(top_k=None, top_p=0.5) == {1, 3}  # 0.4 < 0.5, so the 0.3 token is needed too
    assert draw(top_k=None, top_p=0.4) == {1}
    assert draw(top_k=None, top_p=1.0) == {0, 1, 2, 3}
    assert int(sample_next(logits, 0.0, None, 1.0, [None])) == 1


def test_stop_string_ends_the_sample_and_is_not_printed(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size, position="rope")
    full = generate_text(model, "The", 60, char_tokenizer, seed=5)
    new = full[3:]
    stop = new[20:23]  # appears in the new text at or before index 20
    at = new.index(stop)
    assert generate_text(model, "The", 60, char_tokenizer, seed=5, stop=stop) == "The" + new[:at]
    assert generate_text(model, "The", 60, char_tokenizer, seed=5, stop="not in the output 💥") == full


def test_detokenizer_never_splits_a_character_and_holds_back_a_partial_stop() -> None:
    tokenizer = named("gpt2")
    ids = tokenizer.encode(MULTILINGUAL)
    assert any(not _is_utf8(tokenizer.token_bytes(i)) for i in ids)  # some tokens hold part of a character
    text = Detokenizer(tokenizer)
    pieces = [text.push(i) for i in ids] + [text.finish()]
    assert "".join(pieces) == MULTILINGUAL
    assert not any("\ufffd" in p for p in pieces)

    text = Detokenizer(tokenizer, stop="🚀 and")
    pieces = [text.push(i) for i in ids]
    assert "".join(pieces) == MULTILINGUAL[: MULTILINGUAL.index("🚀")] and text.stopped
    assert text.finish() == ""


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_streamed_pieces_are_the_whole_text_for_a_bpe_model() -> None:
    tokenizer = train_bpe([MULTILINGUAL * 20], 300)
    model = tiny_model(tokenizer.vocab_size)
    stream = stream_text(model, "Grüße 🙂", 80, tokenizer, temperature=1.0, top_k=None, seed=0)
    pieces = list(stream)
    assert pieces[0] == "Grüße 🙂" and stream.new_tokens == 80
    assert "".join(pieces) == generate_text(model, "Grüße 🙂", 80, tokenizer, temperature=1.0, top_k=None, seed=0)
    # Decoding piece by piece equals decoding all new bytes at once (a random byte-level model
    # emits invalid UTF-8 too, which both replace the same way).
    assert "".join(pieces[1:]) == tokenizer.decode(stream.new_ids)


def test_streaming_a_multilingual_char_model(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    stream = stream_text(model, "日本", 50, char_tokenizer, temperature=1.0, top_k=None, seed=1)
    pieces = list(stream)
    assert stream.new_tokens == 50 and len("".join(pieces)) == 52
    assert not any("\ufffd" in p for p in pieces)


def test_empty_prompt_starts_from_a_document_boundary(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    greedy = generate_text(model, "", 10, char_tokenizer, temperature=0)
    assert greedy == char_tokenizer.decode(uncached_greedy(model, char_tokenizer.encode("\n"), 10))

    gpt2 = named("gpt2")
    model = tiny_model(gpt2.vocab_size, n_embed=16)
    assert generate_text(model, "", 5, gpt2, temperature=0) == gpt2.decode(uncached_greedy(model, [50256], 5))
    assert gpt2.eot_id == 50256

    no_newline = train_char(["abc"])
    with pytest.raises(MicroGPTError, match="--prompt"):
        generate_text(tiny_model(3), "", 5, no_newline)


def test_checkpoint_path_gives_the_same_text(make_checkpoint: Callable[..., Path], char_tokenizer: Tokenizer) -> None:
    path = make_checkpoint(position="rope")
    from_path = generate_text(path, "Hello", 30, seed=7, device="cpu")
    model = tiny_model(char_tokenizer.vocab_size, position="rope")
    assert from_path == generate_text(model, "Hello", 30, char_tokenizer, seed=7)
    assert generate_text(path, "Hello", 0, device="cpu") == "Hello"


def test_generation_leaves_training_mode_and_autograd_alone(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size).train()
    for _ in stream_text(model, "Hi", 5, char_tokenizer):
        assert torch.is_grad_enabled()
    assert model.training


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temperature=-0.1), "--temperature"),
        (dict(top_k=0), "--top-k"),
        (dict(top_p=0.0), "--top-p"),
        (dict(top_p=1.01), "--top-p"),
        (dict(length=-1), "--length"),
        (dict(seed=-1), "--seed"),
        (dict(seed=10**23), "--seed"),
        (dict(temperature=float("inf")), "--temperature"),
    ],
)
def test_bad_options_are_clear_errors(options: dict, message: str, char_tokenizer: Tokenizer) -> None:
    """The library names the setting (top_k); the CLI shows it as its flag (--top-k)."""
    with pytest.raises(InvalidSetting) as raised:
        stream_text(tiny_model(char_tokenizer.vocab_size), "Hi", tokenizer=char_tokenizer, **options)
    assert message in raised.value.with_flags()
    assert message.removeprefix("--").replace("-", "_") in str(raised.value)


def test_unknown_character_and_missing_tokenizer_are_clear_errors(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    with pytest.raises(MicroGPTError, match="'€'"):
        stream_text(model, "Hello €", tokenizer=char_tokenizer)
    with pytest.raises(MicroGPTError, match="tokenizer"):
        stream_text(model, "Hi")


@pytest.mark.parametrize("options", [dict(temperature=1.1e-308, top_k=5, top_p=1.0), dict(temperature=1e-31, top_k=None,
                                                                                       top_p=1.0),
                                     dict(temperature=1.0, top_k=None, top_p=1e-320), dict(temperature=1e308, top_k=3,
                                                                                          top_p=1e-30)])
def test_extreme_sampling_settings_still_pick_a_real_token(options: dict) -> None:
    """Found by fuzzing: a temperature or top-p that float32 rounds to 0 used to give NaN probabilities."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9, 0.0]])
    token = sample_next(logits, generators=[torch.Generator().manual_seed(0)], **options)
    assert token.shape == (1,) and 0 <= token.item() < 5
    if options["temperature"] <= 1:
        assert token.item() == 1  # greedy in the limit: the likeliest token


# --- batches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_each_row_of_a_batch_is_what_its_prompt_gives_alone(char_tokenizer: Tokenizer, temperature: float) -> None:
    """Prompts of different lengths (one past the context) share a batch; each row slides on its
    own schedule and draws from seed + row, so it equals that prompt decoded alone."""
    model = tiny_model(char_tokenizer.vocab_size, position="rope")
    prompts = ["H", "Hello wor", TINY_TEXT[:40], "The quick"]
    length = 3 * model.config.context
    batch = generate_texts(model, prompts, length, char_tokenizer, temperature=temperature, top_k=None, seed=11)
    alone = [generate_text(model, p, length, char_tokenizer, temperature=temperature, top_k=None, seed=11 + i)
             for i, p in enumerate(prompts)]
    assert batch == alone
    assert len(set(batch)) == len(prompts)


def test_greedy_samples_all_equal_the_single_greedy_sample(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    single = generate_text(model, "The", 40, char_tokenizer, temperature=0)
    assert generate_texts(model, ["The"] * 5, 40, char_tokenizer, temperature=0) == [single] * 5
    sampled = generate_texts(model, ["The"] * 5, 40, char_tokenizer, temperature=1.0, seed=3)
    assert len(set(sampled)) == 5  # one prompt prefilled once, then forked: the rows still differ


def test_rows_of_a_batch_stop_on_their_own(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    full = generate_texts(model, ["The"] * 3, 60, char_tokenizer, temperature=1.0, seed=5)
    stop = full[1][10:12]
    stopped = generate_texts(model, ["The"] * 3, 60, char_tokenizer, temperature=1.0, seed=5, stop=stop)
    for text, whole in zip(stopped, full):
        new = whole[3:]
        assert text == "The" + (new[: new.index(stop)] if stop in new else new)
    assert len(stopped[1]) < len(full[1])


def test_frequency_and_presence_penalties_lower_the_logits_of_tokens_already_sampled(char_tokenizer: Tokenizer) -> None:
    # Row 0 has sampled token 1 three times and token 2 once; row 1 nothing.
    logits = torch.tensor([[0.0, 3.0, 2.5, 1.0]] * 2)
    counts = torch.tensor([[0.0, 3.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    pick = lambda f, p: sample_next(logits, 0.0, None, 1.0, [None, None], counts, f, p).tolist()
    assert pick(0.0, 0.0) == [1, 1]
    assert pick(0.3, 0.0) == [2, 1]  # per time sampled: 3.0 - 0.9 = 2.1 < 2.5 - 0.3 = 2.2
    assert pick(0.0, 0.3) == [1, 1]  # once: 2.7 > 2.2
    assert pick(0.0, 2.1) == [3, 1]  # 0.9 and 0.4 < 1.0
    assert pick(-1.0, 0.0) == [1, 1]  # a negative penalty favours repeats
    # A sample with the penalty maxed out never repeats a token while unused ones remain.
    model = tiny_model(char_tokenizer.vocab_size)
    plain = char_tokenizer.encode(generate_text(model, "H", 20, char_tokenizer, temperature=0))
    assert len(set(plain)) < len(plain)
    text = generate_text(model, "H", 20, char_tokenizer, temperature=0, presence_penalty=2.0, frequency_penalty=2.0)
    new = char_tokenizer.encode(text)[1:]
    assert len(set(new)) == len(new) == 20


def test_text_before_a_stop_that_starts_mid_token_is_kept() -> None:
    """GPT-2 tokens are often whole words: a stop string starting inside one (" world" holding
    "orld") still lets the token's text before it through (" w")."""
    tokenizer = named("gpt2")
    text = "Hello world, and then some more words."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids[:2]) == "Hello world"  # " world" is one token
    for stop in ("orld", "orld, and", "world"):
        detok = Detokenizer(tokenizer, stop=("never there", stop))
        pieces = [detok.push(i) for i in ids] + [detok.finish()]
        assert "".join(pieces) == text[: text.index(stop)] and detok.stopped, stop


def test_on_a_cpu_each_token_is_out_before_the_next_step_runs(char_tokenizer: Tokenizer) -> None:
    """A CPU has no device to overlap with, so the step that computes the next token runs only
    after this one has been handed out: the first token costs the prompt, not the prompt and a
    step (which time to first token would otherwise count)."""
    sampler = Sampler(tiny_model(char_tokenizer.vocab_size), char_tokenizer)
    prompt = char_tokenizer.encode("Hello")
    stream = sampler.batch([prompt], SamplingSettings(length=4, temperature=0))
    held = []
    for _ in stream:
        held.append(sampler.engine.lengths[0])  # tokens in the cache when each piece arrives
    assert held == [len(prompt) + i for i in range(4)]
    assert 0 < stream.first_token_seconds < stream.seconds
