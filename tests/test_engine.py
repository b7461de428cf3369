"""The inference engine: cached decoding in slots, the captured step's shapes, int8 weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from microgpt_cli.data.tokenizer import Tokenizer
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.engine import Engine, RowMajorLinear, inference_model
from microgpt_cli.infer.evaluation import evaluate
from microgpt_cli.infer.sampling import generate_text

from clitools import microgpt
from conftest import tiny_model


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_cached_logits_match_uncached(position: str) -> None:
    model = tiny_model(40, position=position, qk_norm=position == "rope")
    context = model.config.context
    seq = torch.randint(0, 40, (2, 3 * context), generator=torch.Generator().manual_seed(0))
    engine = Engine(model, slots=2)
    with torch.inference_mode():
        # Prompts of different lengths (one longer than the context): the rows slide at different steps.
        consumed = [5, context + 4]
        logits = [engine.prefill(row, seq[row, :n]) for row, n in enumerate(consumed)]
        for _ in range(2 * context - 4):
            for row, n in enumerate(consumed):
                # Until the cache first fills, the cached model sees exactly the whole sequence; after a
                # slide it sees the newest tokens from position 0, i.e. the sequence since the slide.
                held = engine.lengths[row]
                assert 0 < held <= context
                torch.testing.assert_close(logits[row], model(seq[row : row + 1, n - held : n])[0, -1],
                                           atol=1e-5, rtol=1e-5)
            logits = list(engine.step(torch.stack([seq[row, n] for row, n in enumerate(consumed)])))
            consumed = [n + 1 for n in consumed]


def test_the_captured_step_over_the_whole_cache_matches_the_eager_step() -> None:
    """A CUDA graph replays Engine.forward_step over the whole context (fixed shapes, masked);
    on any device that computes what the eager step over the filled positions does."""
    model = tiny_model(40, position="rope")
    engine = Engine(model, slots=3)
    with torch.inference_mode():
        for slot, length in enumerate((3, 7, 1)):
            engine.prefill(slot, torch.arange(length) % 40)
        tokens = torch.tensor([5, 6, 7])
        eager = engine.forward_step(tokens, max(engine.lengths) + 1)
        whole = engine.forward_step(tokens, engine.context)
    torch.testing.assert_close(whole, eager, atol=1e-6, rtol=1e-6)


def test_the_decoding_copy_matches_the_model_and_leaves_it_alone() -> None:
    model = tiny_model(40)
    fast = inference_model(model)
    assert fast is not model
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.modules())
    assert any(isinstance(m, RowMajorLinear) for m in fast.modules())
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())  # the caller's model is untouched
    idx = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(idx), fast(idx), atol=1e-5)


# --- int8 weights ---------------------------------------------------------------------------


def test_int8_copy_quantizes_every_linear_and_stays_close(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size, n_embed=64, tie_weights=True)
    embedding = model.tok_emb.weight.detach().clone()
    int8 = inference_model(model, "int8")
    linears = [m for m in int8.modules() if type(m).__name__ == "Linear"]
    assert len(linears) == 4 * model.config.n_layer + 1  # qkv, proj, up, down per block, and the head
    assert all(type(m).__module__.startswith("torch.ao.nn.quantized") for m in linears)
    assert torch.equal(model.tok_emb.weight, embedding) and torch.equal(int8.tok_emb.weight, embedding)
    idx = torch.randint(0, char_tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        exact, approx = model(idx), int8(idx)
    assert not torch.equal(exact, approx)  # really int8 ...
    assert float((exact - approx).abs().max() / exact.std()) < 0.1  # ... and close


def test_eval_and_generate_with_int8_weights(make_checkpoint: Callable[..., Path], data_dir: Path,
                                             tmp_path: Path) -> None:
    ckpt = make_checkpoint()
    exact = evaluate(ckpt, data_dir, device="cpu")
    int8 = evaluate(ckpt, data_dir, device="cpu", quantize="int8")
    assert int8.quantize == "int8" and exact.quantize is None
    assert int8.loss != exact.loss and abs(int8.loss - exact.loss) < 0.02
    run = microgpt("eval", "-c", ckpt, "--data", data_dir, "--quantize", "int8", "--json", "--device", "cpu")
    assert json.loads(run.stdout)["quantize"] == "int8"
    run = microgpt("generate", "-c", ckpt, "--prompt", "Hello", "--length", "30", "--quantize", "int8",
                   "--device", "cpu", "--seed", "4")
    assert "int8 weights" in run.stderr
    assert run.stdout == generate_text(ckpt, "Hello", 30, seed=4, device="cpu", quantize="int8") + "\n"
    assert len(run.stdout) == len("Hello") + 30 + 1


def test_quantize_is_checked(char_tokenizer: Tokenizer) -> None:
    model = tiny_model(char_tokenizer.vocab_size)
    with pytest.raises(MicroGPTError, match="unknown quantize 'int4'"):
        Engine(model, quantize="int4")
    with pytest.raises(MicroGPTError, match="CPU only"):
        Engine(tiny_model(char_tokenizer.vocab_size).to("meta"), quantize="int8")
    with pytest.raises(MicroGPTError, match="1 to 1,024"):
        Engine(model, slots=0)
    with pytest.raises(MicroGPTError, match="CUDA graphs need a CUDA device"):
        Engine(model, graphs=True)
