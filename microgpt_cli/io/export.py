"""Export a checkpoint for other tools: a Hugging Face transformers GPT-2 model directory, or the
plain weights as safetensors with the config needed to rebuild them here.

Both write into a temp dir beside `out` and rename it into place, so a failed export never
leaves half a model where a loader would find it.

torch and the model load when a function runs, not at import: the CLI imports this module to
show `microgpt export --help`, which should not wait a second for torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

from microgpt_cli.config import ModelConfig
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.io.files import atomic_dir, check_replaceable, output_lock

if TYPE_CHECKING:
    import torch

    from microgpt_cli.data.tokenizer import Tokenizer
    from microgpt_cli.io.checkpoint import Checkpoint
    from microgpt_cli.model.gpt import GPT

ExportFormat = Literal["auto", "hf", "safetensors"]
FORMATS: tuple[str, ...] = get_args(ExportFormat)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Our names -> GPT-2's, for the tensors of block i. Linear weights are transposed because GPT-2
# uses Conv1D layers, which store (in_features, out_features).
GPT2_BLOCK_NAMES = {
    "norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.c_attn.weight", "attn.qkv.bias": "attn.c_attn.bias",
    "attn.proj.weight": "attn.c_proj.weight", "attn.proj.bias": "attn.c_proj.bias",
    "norm2.weight": "ln_2.weight", "norm2.bias": "ln_2.bias",
    "mlp.up.weight": "mlp.c_fc.weight", "mlp.up.bias": "mlp.c_fc.bias",
    "mlp.down.weight": "mlp.c_proj.weight", "mlp.down.bias": "mlp.c_proj.bias",
}
_HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu_new"}  # ours is the tanh approximation, HF's gelu_new


class Exported(NamedTuple):
    path: Path
    format: str  # what was written: hf or safetensors
    note: str  # why, where "auto" chose safetensors


def export(checkpoint_path: str | Path, out: str | Path, format: str = "auto", force: bool = False) -> Exported:
    """Export a checkpoint file or run dir to the directory `out` as `format`: hf, safetensors, or
    auto (hf where GPT-2's architecture can express the model, else safetensors).

    An existing non-empty `out` is replaced only with `force`, only if an earlier export made it,
    and only once the new one is complete."""
    from microgpt_cli.io import checkpoint

    if format not in FORMATS:
        raise MicroGPTError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not force:
            raise MicroGPTError(
                f"{out} already exists and is not empty; pass --force to replace it or choose another --out")
        _check_replaceable(out)
    from safetensors import SafetensorError

    with output_lock(out, "`microgpt export`"):  # which also clears what a killed export to `out` left
        state = checkpoint.load(checkpoint_path)
        state.build_model()  # the weights fit the config they are exported with, or a clear error
        problems = gpt2_problems(state.model_config)
        note = ""
        if format == "auto":
            format = "safetensors" if problems else "hf"
            note = f"not hf: a transformers GPT-2 cannot express {'; '.join(problems)}" if problems else ""
        elif format == "hf" and problems:
            raise MicroGPTError(f"this model cannot be exported as a Hugging Face GPT-2: {'; '.join(problems)}; "
                                f"use --format safetensors instead")
        try:
            with atomic_dir(out, force=True) as tmp:
                if format == "hf":
                    _write_hf(tmp, state)
                else:
                    _write_safetensors(tmp, state)
        except SafetensorError as exc:  # its I/O errors (a full disk, say) are not OSErrors
            raise MicroGPTError(f"cannot write {out / WEIGHTS_FILE}: {exc}") from exc
    return Exported(out, format, note)


ADDED_TOKENS_FILE = "added_tokens.json"  # a chat model's delimiters, after GPT-2's 50,257 tokens
EXPORT_FILES = {WEIGHTS_FILE, CONFIG_FILE, "vocab.json", "merges.txt", "special_tokens_map.json", ADDED_TOKENS_FILE,
                "tokenizer_config.json"}


def _check_replaceable(out: Path) -> None:
    """`export --force` replaces what an export made (its files, with a config.json that says
    microgpt wrote it), never an unrelated dir or file."""
    check_replaceable(out, EXPORT_FILES, "a dir", "`microgpt export`")
    try:
        config = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if not (isinstance(config, dict) and (config.get("format") == "microgpt" or "microgpt" in config)):
        raise MicroGPTError(f"{out} is not a dir made by `microgpt export` (no {CONFIG_FILE} of microgpt's); --force "
                            f"replaces only those: choose another --out")


def gpt2_problems(config: ModelConfig) -> list[str]:
    """The options of a model that GPT-2's architecture cannot express exactly (none: it can)."""
    problems = []
    if config.position != "learned":
        problems.append(f"--position {config.position} (GPT-2 has learned positions)")
    if config.norm != "layernorm":
        problems.append(f"--norm {config.norm} (GPT-2 has LayerNorm)")
    if config.activation not in _HF_ACTIVATIONS:
        problems.append(f"--activation {config.activation} (GPT-2 takes relu or gelu)")
    if config.qk_norm:
        problems.append("--qk-norm (GPT-2 has no query/key norm)")
    if not config.bias:
        problems.append("--no-bias (GPT-2 has biases)")
    return problems


def _save_weights(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / WEIGHTS_FILE, metadata={"format": "pt"})


def _write_hf(directory: Path, state: Checkpoint) -> None:
    from microgpt_cli.model.gpt import block_param

    config, weights = state.model_config, state.model
    real = config.vocab_size  # the rows of the tokenizer's ids, without any padding
    tensors = {"transformer.wte.weight": weights["tok_emb.weight"][:real],
               "transformer.wpe.weight": weights["pos_emb.weight"]}
    for i in range(config.n_layer):
        for ours, theirs in GPT2_BLOCK_NAMES.items():
            tensor = weights[block_param(i, ours)]
            tensors[f"transformer.h.{i}.{theirs}"] = tensor.t() if tensor.dim() == 2 else tensor
    tensors["transformer.ln_f.weight"] = weights["norm.weight"]
    tensors["transformer.ln_f.bias"] = weights["norm.bias"]
    if not config.tie_weights:  # a tied head is rebuilt from wte by transformers
        tensors["lm_head.weight"] = weights["head.weight"][:real]
    _save_weights(tensors, directory)

    from microgpt_cli.data.tokenizer import GPT2_END_OF_TEXT

    spec = state.tokenizer
    gpt2_tokens = spec["kind"] == "gpt2"
    special = GPT2_END_OF_TEXT if gpt2_tokens else None  # GPT-2's bos, eos and unk; others have none
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context,
        "n_embd": config.n_embed,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": 4 * config.n_embed,
        "activation_function": _HF_ACTIVATIONS[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,  # torch.nn.LayerNorm's default, which gpt.py uses
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": config.tie_weights,
        "bos_token_id": special,
        "eos_token_id": special,
        "microgpt": {"model_config": asdict(config), "tokenizer": _tokenizer_summary(spec)},
    }
    _write_json(directory / CONFIG_FILE, hf_config)
    if gpt2_tokens:
        _write_gpt2_tokenizer(directory, config.context, spec)


def _tokenizer_summary(spec: dict[str, Any]) -> dict[str, Any]:
    # The full spec of a bpe tokenizer is megabytes of tokens; config.json only names it.
    return {"kind": spec["kind"], "name": spec.get("name", spec["kind"])}


def _write_gpt2_tokenizer(directory: Path, context: int, spec: dict[str, Any]) -> None:
    """GPT-2's own files (the same ones the gpt2 tokenizer is built from), under HF's names; a chat
    model's delimiters as added tokens, and its template as the Jinja `apply_chat_template` runs."""
    from microgpt_cli.data.chat import ChatTemplate
    from microgpt_cli.data.tokenizer import GPT2_END_OF_TEXT, gpt2_bpe_file

    (directory / "vocab.json").write_bytes(gpt2_bpe_file("encoder.json"))
    (directory / "merges.txt").write_bytes(gpt2_bpe_file("vocab.bpe"))
    eot = "<|endoftext|>"
    _write_json(directory / "special_tokens_map.json", {"bos_token": eot, "eos_token": eot, "unk_token": eot})
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": context, "add_prefix_space": False,
        "bos_token": eot, "eos_token": eot, "unk_token": eot,
    }
    if spec.get("added"):
        _write_json(directory / ADDED_TOKENS_FILE,
                    {token: GPT2_END_OF_TEXT + 1 + i for i, token in enumerate(spec["added"])})
    if spec.get("chat_template"):
        tokenizer_config["chat_template"] = ChatTemplate.from_dict(spec["chat_template"]).jinja()
    _write_json(directory / "tokenizer_config.json", tokenizer_config)


def _write_safetensors(directory: Path, state: Checkpoint) -> None:
    from microgpt_cli.io.checkpoint import FORMAT_VERSION

    weights = dict(state.model)
    if state.model_config.tie_weights:
        del weights["head.weight"]  # safetensors refuses shared tensors; the loader re-ties it
    _save_weights(weights, directory)
    _write_json(directory / CONFIG_FILE, {
        "format": "microgpt", "version": FORMAT_VERSION,
        "model_config": asdict(state.model_config), "tokenizer": state.tokenizer,
    })


def load_safetensors_export(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The model (eval mode) and tokenizer of an `export --format safetensors` directory, checked as
    strictly as a checkpoint file (it is one, in other files)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from microgpt_cli.io.checkpoint import FORMAT_VERSION as CHECKPOINT_VERSION
    from microgpt_cli.io.checkpoint import Checkpoint

    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        if not isinstance(config, dict) or config.get("format") != "microgpt":
            raise ValueError(f'its {CONFIG_FILE} does not say "format": "microgpt"')
        weights = load_file(directory / WEIGHTS_FILE)
    except (OSError, ValueError, SafetensorError) as exc:
        raise MicroGPTError(f"{directory} is not a microgpt safetensors export: {str(exc)[:200]}") from None
    model_config = config.get("model_config")
    if isinstance(model_config, dict) and model_config.get("tie_weights") and "tok_emb.weight" in weights:
        weights["head.weight"] = weights["tok_emb.weight"]  # stored once; the model has it under both names
    state = {"version": CHECKPOINT_VERSION, "model": weights, "model_config": model_config,
             "tokenizer": config.get("tokenizer")}
    checkpoint = Checkpoint.from_dict(state, directory / CONFIG_FILE)
    return checkpoint.build_model().to(device).eval(), checkpoint.tokenizer_object()


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
