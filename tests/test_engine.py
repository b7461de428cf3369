"""The inference engine: cached decoding in slots, the captured step's shapes, int8 weights."""

from __future__ import annotations

import gc
import json
import mmap
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from microgpt_cli.data.tokenizer import Tokenizer
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer import weights
from microgpt_cli.infer.engine import GROW_STEP, Engine, RowBlockLinear, SlotCache, inference_model
from microgpt_cli.infer.evaluation import evaluate
from microgpt_cli.infer.sampling import generate_text
from microgpt_cli.infer.threads import ThreadChooser
from microgpt_cli.infer.weights import ROW_BLOCK_ROWS, SPLIT_FROM, PackedLinear, SourceLinear, onednn_linear
from microgpt_cli.io import checkpoint
from microgpt_cli.model.gpt import BLOCK_MATRICES, block_param

from clitools import assert_one_error_line, microgpt, run_cli
from conftest import TINY_TEXT, tiny_model


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_cached_logits_match_uncached(position: str) -> None:
    model = tiny_model(40, position=position, qk_norm=position == "rope")
    context = model.config.context
    seq = torch.randint(0, 40, (2, 3 * context), generator=torch.Generator().manual_seed(0))
    engine = Engine(model, slots=2)
    with torch.inference_mode():
        # Prompts of different lengths (one longer than the context): the rows slide at different steps.
        consumed = [5, context + 4]
        # The window each row holds, by the documented rule rather than the engine's own count: the
        # whole sequence until it fills the context, then the newest context // 2 tokens, and so on.
        held = [min(n, context) for n in consumed]
        logits = [engine.prefill(row, seq[row, :n]) for row, n in enumerate(consumed)]
        slides = 0
        for _ in range(2 * context - 4):
            for row, n in enumerate(consumed):
                assert engine.lengths[row] == held[row]
                torch.testing.assert_close(logits[row], model(seq[row : row + 1, n - held[row] : n])[0, -1],
                                           atol=1e-5, rtol=1e-5)
            logits = list(engine.step(torch.stack([seq[row, n] for row, n in enumerate(consumed)])))
            slides += sum(h == context for h in held)
            held = [context // 2 if h == context else h + 1 for h in held]
            consumed = [n + 1 for n in consumed]
        assert slides >= 4  # each row slid at least twice


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
    assert isinstance(fast.head, RowBlockLinear)
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())  # the caller's model is untouched
    assert all(p.requires_grad for p in model.parameters())
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
    assert torch.equal(model.tok_emb.weight, embedding)  # the caller's model is untouched, gradients included
    assert all(p.requires_grad for p in model.parameters()) and int8.tok_emb.weight is not model.tok_emb.weight
    assert torch.equal(int8.tok_emb.weight, embedding)  # a small embedding stays fp32
    large = tiny_model(50257, n_embed=32, tie_weights=True)  # 1.6M weights: int8, a quarter of the fp32 table
    embedding = large.tok_emb.weight.detach()
    quantized = inference_model(large, "int8").tok_emb
    assert type(quantized.embedding).__module__.startswith("torch.ao.nn.quantized")
    ids = torch.tensor([[0, 1, 25000], [50256, 7, 7]])
    torch.testing.assert_close(quantized(ids), embedding[ids], atol=float(embedding.abs().max()) / 100, rtol=0)
    assert torch.equal(quantized(ids.t()), quantized(ids).transpose(0, 1))  # ids in any layout
    with pytest.raises(IndexError):  # as nn.Embedding says it
        quantized(torch.tensor([50257]))
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


# --- layouts, memory and threads (CPU inference speed, issue 24) ----------------------------


def greedy_alone(engine: Engine, ids: list[int], steps: int) -> list[int]:
    with torch.inference_mode():
        logits = engine.prefill(0, ids)[None]
        out = []
        for _ in range(steps):
            token = logits.argmax(-1)
            out.append(int(token))
            logits = engine.step(token)
    return out


def test_both_fp32_layouts_decode_the_models_greedy_tokens_past_the_context() -> None:
    """One sample decodes with the weights as stored, in blocks of rows, several with
    oneDNN-packed ones and the tied head read from the embedding itself: on a GPT-2-vocabulary
    model, rows of different lengths (one longer than the context) decoded together give what
    each gives alone, and that is the original model's greedy choice, uncached, while the
    sequence fits the window."""
    model = tiny_model(50257, n_embed=32)
    context, steps = model.config.context, 3 * model.config.context
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    prompts = [list(range(100, 100 + n)) for n in (3, 9, context + 4)]
    alone = Engine(model, 1)
    batch = Engine(model, len(prompts))
    assert isinstance(alone.model.head, RowBlockLinear)
    assert alone.model.head.blocks.size(0) == torch.get_num_threads()  # a block per thread
    assert alone.model.tok_emb.weight.data_ptr() == alone.model.head.weight.data_ptr()  # one tensor for both
    if onednn_linear():
        assert isinstance(batch.model.head, SourceLinear)
        assert isinstance(batch.model.get_submodule("blocks.0.attn.qkv"), PackedLinear)
        assert batch.model.head.weight.data_ptr() == batch.model.tok_emb.weight.data_ptr()  # one tensor for both
    expected = [greedy_alone(alone, ids, steps) for ids in prompts]
    with torch.inference_mode():
        logits = torch.stack([batch.prefill(row, ids) for row, ids in enumerate(prompts)])
        together: list[list[int]] = [[] for _ in prompts]
        for _ in range(steps):
            tokens = logits.argmax(-1)
            for row, token in enumerate(tokens.tolist()):
                together[row].append(token)
            logits = batch.step(tokens)
    assert together == expected
    with torch.inference_mode():
        seq = torch.tensor([prompts[0]])
        for _ in range(context - len(prompts[0])):
            seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert expected[0][: context - 3] == seq[0, 3:].tolist()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # the caller's model


def test_without_onednn_every_layout_is_the_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch built without oneDNN (ARM, some custom builds) decodes batches with the weights
    in blocks of rows, to the same tokens."""
    model = tiny_model(50257, n_embed=32)
    packed = greedy_alone(Engine(model, 2), [5, 6, 7], 20)
    monkeypatch.setattr(weights, "onednn_linear", lambda: False)
    plain = Engine(model, 2)
    assert not any(isinstance(m, (PackedLinear, SourceLinear)) for m in plain.model.modules())
    assert greedy_alone(plain, [5, 6, 7], 20) == packed


def resident_bytes(tensor: torch.Tensor) -> int:
    """Bytes of `tensor`'s pages that are in memory (present in /proc/self/pagemap)."""
    page = mmap.PAGESIZE
    first = tensor.data_ptr() // page
    count = -(-(tensor.data_ptr() + tensor.nbytes) // page) - first
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = np.frombuffer(pagemap.read(count * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="reads Linux's /proc")
def test_the_cache_grows_with_the_tokens_in_use() -> None:
    """On a CPU the cache spans the context but holds only the pages written, counted in the
    kernel's page map: one 4 KB page per 16 positions of a head here (head size 64). A cache
    allocated whole (zeros) would hold every page of the context from the start."""
    model = tiny_model(40, context=256, n_embed=128, n_head=2)
    engine = Engine(model, slots=2)
    tensors = engine.cache.keys + engine.cache.values
    positions_per_page = mmap.PAGESIZE // (64 * 4)

    def cache_bytes() -> int:
        return sum(resident_bytes(t) for t in tensors)

    def expected(*lengths: int) -> int:  # 2 heads per slot
        return len(tensors) * 2 * sum(-(-length // positions_per_page) for length in lengths) * mmap.PAGESIZE

    with torch.inference_mode():
        assert cache_bytes() == 0
        engine.prefill(0, [1, 2, 3, 4, 5])
        assert cache_bytes() == expected(5)
        engine.fork(0, [1])
        assert cache_bytes() == expected(5, 5)
        logits = engine.step(torch.tensor([6, 7]))
        for _ in range(100):
            logits = engine.step(logits.argmax(-1))
        assert engine.lengths == [106, 106] and cache_bytes() == expected(106, 106) < expected(256, 256)
        for _ in range(200):  # past the context: the window slides, the cache stays the context's
            logits = engine.step(logits.argmax(-1))
        assert max(engine.lengths) < 256 and cache_bytes() == expected(256, 256)
    assert all(t.nbytes == 2 * 2 * 256 * 64 * 4 for t in tensors)


_ADDRESS_LIMIT = """
import resource, sys, torch
from conftest import tiny_model
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.engine import Engine
model = tiny_model(50, context=1024, n_embed=768, n_head=12, n_layer=2)
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (600 << 20), resource.RLIM_INFINITY))
engine = Engine(model, slots=64)  # the whole context's cache: 805 MB of addresses
with torch.inference_mode():
    engine.prefill(0, list(range(1, 30)))
    engine.fork(0, range(1, 64))
    for _ in range(5):
        engine.step(torch.ones(64, dtype=torch.long))
print("paged" if engine.cache.paged else "grown", engine.cache.capacity)
try:  # a context of 128: its first positions are its whole cache, 944 MB for 600 sequences
    Engine(tiny_model(50, context=128, n_embed=768, n_head=12, n_layer=2), slots=600)
except MicroGPTError as exc:
    print(exc)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_a_cache_refused_its_addresses_grows_by_copies_and_runs_out_in_one_line() -> None:
    """Under an address-space limit (`ulimit -v`) the whole context cannot be mapped: the cache
    grows by copies as before, and a batch too large even for that is one clear error."""
    out = subprocess.run([sys.executable, "-c", _ADDRESS_LIMIT], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent).stdout.splitlines()
    assert out[0] == f"grown {GROW_STEP}", out
    assert out[1].startswith("out of memory for the KV cache of 600 sequences: ") and "decode fewer" in out[1], out


def test_a_cache_that_grows_by_copies_keeps_what_it_holds() -> None:
    """Where memory is not given page by page (a GPU without CUDA graphs), the cache holds the
    positions in use rounded up to GROW_STEP and grows by copying what it holds."""
    config = tiny_model(40, context=2 * GROW_STEP).config
    cache = SlotCache(config, 2, torch.device("cpu"), torch.float32, paged=False)
    assert cache.capacity == GROW_STEP and cache.keys[0].size(2) == GROW_STEP
    cache.keys[1][:, :, :GROW_STEP] = written = torch.randn_like(cache.keys[1])
    cache.reserve(GROW_STEP + 1)
    assert cache.capacity == 2 * GROW_STEP and cache.values[0].size(2) == 2 * GROW_STEP
    assert torch.equal(cache.keys[1][:, :, :GROW_STEP], written)
    assert not cache.keys[1][:, :, GROW_STEP:].any()
    cache.reserve(10 * GROW_STEP)  # never past the context
    assert cache.capacity == 2 * GROW_STEP


def test_a_loaded_checkpoint_is_never_held_twice(make_checkpoint: Callable[..., Path]) -> None:
    """The loader's model holds the checkpoint's tensors themselves (built on the meta device),
    and an engine given it in place converts it layer by layer: the fp32 weights it replaced are
    freed, not kept beside the new layout."""
    path = make_checkpoint(position="rope", qk_norm=True)
    state = checkpoint.load(path)
    model = state.build_model()
    assert model.get_buffer("rope_cos").device.type == "cpu"  # unsaved buffers are real, not meta
    assert model.tok_emb.weight.data_ptr() == state.model["tok_emb.weight"].data_ptr()
    reference = tiny_model(model.config.vocab_size, position="rope", qk_norm=True)
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(idx), reference(idx))
    del state
    replaced = [weakref.ref(model.get_parameter(block_param(0, name))) for name in BLOCK_MATRICES]
    engine = Engine(model, slots=2, in_place=True)
    gc.collect()
    assert engine.model is model and all(ref() is None for ref in replaced)
    with torch.inference_mode():
        torch.testing.assert_close(engine.model(idx), reference(idx), atol=1e-5, rtol=1e-5)


def test_the_thread_chooser_runs_the_faster_count_and_follows_a_change_of_load() -> None:
    """A call 4x slower with 2 threads than with 1 (a busy machine) runs with 1, and 2 is tried
    again now and then; when 2 becomes the faster (the load went away), it is used within a few
    dozen calls. Times are given, not measured, so that this machine's own load cannot decide."""
    chooser = ThreadChooser(2)

    def calls(seconds: dict[int, float], n: int) -> list[int]:
        used = []
        for _ in range(n):
            threads = chooser.choose("step")
            chooser.record("step", threads, seconds[threads])
            used.append(threads)
        return used

    busy = calls({1: 1.0, 2: 4.0}, 300)
    assert busy[-50:].count(1) >= 48
    assert 2 <= busy[3:].count(2) <= 6  # retried every ~24 x 4 calls
    idle = calls({1: 1.0, 2: 0.5}, 150)
    assert idle[-50:].count(2) >= 47
    threads = torch.get_num_threads()
    assert ThreadChooser(2).run("prefill", torch.get_num_threads) in (1, 2)
    assert torch.get_num_threads() == threads  # run leaves the caller's setting as it was


def test_threads_option_and_environment_variable(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                 make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = make_checkpoint()
    code, out, _ = run_cli(capsys, "generate", "-c", ckpt, "--prompt", "Hello", "--length", "20", "--threads", "1",
                           "--seed", "3", "--device", "cpu")
    assert code == 0 and out == generate_text(ckpt, "Hello", 20, seed=3, device="cpu") + "\n"
    monkeypatch.setenv("MICROGPT_THREADS", "100000")
    for command in (["generate", "-c", ckpt], ["eval", "-c", ckpt, "--text", ckpt], ["serve", "-c", ckpt],
                    ["prepare", "--sample", "tinyshakespeare", "--out", tmp_path / "d"]):
        assert_one_error_line(*run_cli(capsys, *command)[::2], "--threads must be between 0 and 1024")
    monkeypatch.delenv("MICROGPT_THREADS")
    text = tmp_path / "in.txt"
    text.write_text(TINY_TEXT * 40, encoding="utf-8")
    for threads in ("1", "3"):
        code, _, err = run_cli(capsys, "prepare", text, "--tokenizer", "char", "--out", tmp_path / threads,
                               "--threads", threads)
        assert code == 0, err
    assert (tmp_path / "1" / "train.bin").read_bytes() == (tmp_path / "3" / "train.bin").read_bytes()


@pytest.mark.parametrize("split", [1, 2, 3, 4])
def test_the_row_blocks_are_the_linear_layer(split: int) -> None:
    """Blocks of rows, one per thread (50,257 outputs divide by none of 2, 3 and 4, so the blocks
    overlap; a small layer stays whole): the same product as nn.Linear for one row, a few, and
    more than the blocks take, with a bias; the blocks are views of one weight, not padded
    copies."""
    torch.manual_seed(0)
    for linear in (torch.nn.Linear(32, 50257, bias=False), torch.nn.Linear(32, 12)):
        blocked = RowBlockLinear(linear, split=split)
        assert blocked.blocks.size(0) == (split if linear.weight.numel() >= SPLIT_FROM else 1)  # small: one block
        assert blocked.blocks.untyped_storage().data_ptr() == blocked.weight.untyped_storage().data_ptr()  # views
        with torch.no_grad():
            for x in (torch.randn(1, 32), torch.randn(1, 1, 32), torch.randn(2, 5, 32),
                      torch.randn(ROW_BLOCK_ROWS + 1, 32)):
                torch.testing.assert_close(blocked(x), linear(x), atol=1e-5, rtol=1e-5)


# --- memory of a load -----------------------------------------------------------------------------

_LOAD_MEMORY = """
import json, sys
from pathlib import Path
from microgpt_cli.config import SamplingSettings
from microgpt_cli.data.tokenizer import named
from microgpt_cli.infer.sampling import load_sampler
def status(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024
before = status("VmRSS:")
named("gpt2").encode("warm")  # GPT-2's BPE tables, built once per process: not the model's
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
base = status("VmRSS:")
sampler = load_sampler(sys.argv[1], device="cpu", quantize=sys.argv[2], threads=2)
after = status("VmRSS:") - base
assert len(list(sampler.stream("Hello", SamplingSettings(length=3, seed=0)))) >= 1
file_pages, inside = 0, False  # the checkpoint's pages still resident after a prompt
for line in Path("/proc/self/smaps").read_text().splitlines():
    if "-" in line.split()[0] and ":" not in line.split()[0]:
        inside = line.endswith(sys.argv[1])
    elif inside and line.startswith("Rss:"):
        file_pages += int(line.split()[1]) * 1024
print(json.dumps({"peak": status("VmHWM:") - base, "after": after, "file": file_pages, "tokenizer": base - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
def test_a_loaded_model_is_never_held_twice(tmp_path: Path) -> None:
    """A GPT-2-vocabulary model (a 51 MB tied embedding and 25 MB of blocks) loaded for decoding
    in a fresh process. fp32: the engine copies each weight and lets its pages in the file go
    (keeping both, or a finite-check over the whole tensor, would add a model's worth). int8:
    the fp32 weights are quantized a block of rows at a time, their pages let go block by block
    (quantized whole, the tied embedding's fp32 tensor and its int8 copies met: 1.66x), and the
    embedding is int8 too (an fp32 one would stay at the file's size). Either way decoding reads
    its own copies, not the file's pages (the kernel maps those in large folios, megabytes
    around each small bias). GPT-2's tokenizer costs 24 MB, not the 53 it took while its files
    were found by importing the package that ships them (which builds a tokenizer of its own)."""
    from microgpt_cli.data.tokenizer import named

    path = tmp_path / "gpt2-vocab.pt"
    checkpoint.save(path, checkpoint.Checkpoint.of(tiny_model(50257, n_embed=256, n_layer=8), named("gpt2")))
    size = path.stat().st_size
    for quantize, peak, after in (("none", 1.6, 1.5), ("int8", 1.3, 1.0)):
        out = subprocess.run([sys.executable, "-c", _LOAD_MEMORY, str(path), quantize], capture_output=True,
                             text=True, check=True).stdout
        memory = json.loads(out)
        assert memory["peak"] < peak * size and memory["after"] < after * size, (quantize, memory, size)
        assert memory["file"] < 0.05 * size, (quantize, memory, size)  # decoding reads its own copies
        assert memory["tokenizer"] < 40 << 20, memory


def test_a_step_gives_the_same_logits_on_any_thread_count() -> None:
    """The engine picks each step's thread count from timings (threads.py), so a seed's text must
    not depend on it: torch's fused CPU attention split a one-query step by the thread count,
    and its last bits (and now and then a sampled token) changed with it. Rows of different
    lengths (a masked step) and one row."""
    from microgpt_cli.device import torch_threads

    model = tiny_model(50257, n_embed=256, n_head=4, context=64)
    engine = Engine(model, slots=3, threads=2)
    with torch.inference_mode():
        for slot, length in enumerate((59, 3, 10)):
            engine.prefill(slot, list(range(1, length + 1)))
        # (rows, span): the fused kernel's split, and so its last bits, varied with the span.
        for rows, span in [(1, span) for span in range(2, 61, 3)] + [(3, 60)]:
            steps = []
            for threads in (1, 2):
                with torch_threads(threads):  # the same step twice: it writes the same keys again
                    steps.append(engine.forward_step(torch.arange(rows) + 7, span, masked=rows > 1))
            assert torch.equal(*steps), (rows, span, (steps[0] - steps[1]).abs().max())


def test_row_blocks_read_each_row_about_once_on_many_threads() -> None:
    """On a many-core machine the block count is at most the thread count, chosen so that the
    blocks' overlap stays under 1% of the rows (56 blocks of GPT-2's 768 rows would read the
    weight 3.9 times)."""
    for out, threads in ((768, 56), (768, 112), (2304, 112), (50257, 56), (50257, 2)):
        linear = torch.nn.Linear(512, out)
        blocked = RowBlockLinear(linear, split=threads)
        blocks, width, _ = blocked.blocks.shape
        assert 1 < blocks <= threads and blocks * width <= out * 1.01, (out, threads, blocks, width)
        with torch.no_grad():
            x = torch.randn(1, 512)
            torch.testing.assert_close(blocked(x), linear(x), atol=1e-4, rtol=1e-4)


def test_a_weight_in_another_layout_decodes_as_the_model() -> None:
    """A GPT built in Python may hold a weight that is a transposed view: the engine's copy is
    row-major, as the row blocks read it."""
    for tied in (True, False):
        model = tiny_model(50257, n_embed=64, tie_weights=tied)
        model.head.weight = torch.nn.Parameter(model.head.weight.detach().t().contiguous().t())
        if tied:
            model.tok_emb.weight = model.head.weight
        with torch.inference_mode():
            expected = model(torch.tensor([[1, 2, 3]]))[0, -1]
            torch.testing.assert_close(Engine(model, 1).prefill(0, [1, 2, 3]), expected, atol=1e-5, rtol=1e-5)
