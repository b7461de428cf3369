"""`microgpt import`: pretrained GPT-2 weights in, an ordinary microgpt checkpoint out.

Sources: a local Hugging Face GPT-2 directory (config.json + model.safetensors, or a
pytorch_model.bin that loads with weights_only=True), a Hub name fetched through huggingface_hub
and its cache, or a directory made by `microgpt export` (either format). Loading never runs code
from the files: safetensors, or torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from microgpt_cli.config import Activation, ModelConfig
from microgpt_cli.data.tokenizer import GPT2_END_OF_TEXT, Tokenizer, named
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.io import checkpoint
from microgpt_cli.io.checkpoint import check_tensors
from microgpt_cli.io.export import CONFIG_FILE, GPT2_BLOCK_NAMES, WEIGHTS_FILE, load_safetensors_export
from microgpt_cli.io.files import output_lock
from microgpt_cli.model.gpt import GPT, block_param

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
HUB_FILES = [CONFIG_FILE, WEIGHTS_FILE]
# transformers' names -> ours; our GELU is the tanh approximation, GPT-2's gelu_new.
_MASK_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")  # GPT-2's causal-mask constants, saved in older files
_ACTIVATIONS: dict[str, Activation] = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}


def import_model(source: str, out: str | Path, force: bool = False) -> tuple[Path, GPT, Tokenizer]:
    """Write the checkpoint of `source` to `out` (replacing a file only with `force`, and only a
    microgpt checkpoint); returns the path written, the model and its tokenizer (GPT-2's, or an
    export's own)."""
    out = Path(out)
    if out.is_dir():
        raise MicroGPTError(f"{out} is a directory; --out takes the checkpoint file to write, e.g. gpt2.pt")
    if out.exists() and not force:
        raise MicroGPTError(f"{out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not checkpoint.is_checkpoint(out):
        raise MicroGPTError(f"{out} is not a microgpt checkpoint; --force replaces only those: choose another --out")
    with output_lock(out, "`microgpt import`"):  # which also clears what a killed import of `out` left
        model, tokenizer = _load(_local_directory(source))
        checkpoint.save(out, checkpoint.Checkpoint.of(model, tokenizer))
    return out, model, tokenizer


def _local_directory(source: str) -> Path:
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise MicroGPTError(f"{source} is a file; pass a model directory (config.json + model.safetensors) or a "
                            f"Hub name ({', '.join(HUB_NAMES)})")
    if source not in HUB_NAMES:
        raise MicroGPTError(f"{source} is neither a directory nor a known Hub name ({', '.join(HUB_NAMES)})")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=HUB_FILES))
    except Exception as exc:  # huggingface_hub raises many kinds when offline or missing
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise MicroGPTError(f"cannot download {source}: no network or no cached copy ({first}); pass a local model "
                            "directory") from None


def _load(directory: Path) -> tuple[GPT, Tokenizer]:
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MicroGPTError(f"{directory} has no {CONFIG_FILE}: not a Hugging Face or microgpt model dir") from None
    except (OSError, ValueError) as exc:
        raise MicroGPTError(f"{directory / CONFIG_FILE} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise MicroGPTError(f"{directory / CONFIG_FILE} is not a model config")
    _check_types(config, directory / CONFIG_FILE)
    if config.get("format") == "microgpt":  # export --format safetensors
        return load_safetensors_export(directory)
    exported = config.get("microgpt", {}).get("tokenizer", {}).get("kind")
    if exported not in (None, "gpt2"):
        raise MicroGPTError(f"{directory} was exported from a model with a {exported} tokenizer; import its "
                            "`export --format safetensors` directory instead, which carries that tokenizer")
    model_config = _model_config(config, directory)
    tokenizer = named("gpt2")
    state = _from_gpt2_names(_weights(directory), model_config, directory)
    try:  # counts the weights against the config before building it: a hostile config may claim a huge model
        model = checkpoint.Checkpoint(state, model_config, tokenizer.spec).build_model()
    except MicroGPTError as exc:
        raise MicroGPTError(f"{directory}: {exc}") from None
    return model.eval(), tokenizer


# The JSON type of each config.json key read here, where present: (Python types, as said in an error).
_STRING, _BOOL, _INT = ((str,), "a string"), ((bool,), "true or false"), ((int,), "an integer")
_KEY_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    **dict.fromkeys(["model_type", "activation_function", "format"], _STRING),
    **dict.fromkeys(["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "scale_attn_weights",
                     "tie_word_embeddings"], _BOOL),
    **dict.fromkeys(["vocab_size", "n_layer", "n_head", "n_embd", "n_positions"], _INT),
    "n_inner": ((int, type(None)), "an integer or null"),
    "layer_norm_epsilon": ((int, float), "a number"),
    "microgpt": ((dict,), "an object"),
}


def _check_types(config: dict[str, Any], path: Path) -> None:
    """Validate at the edge: each key this module reads has its JSON type, so the rest can trust it."""
    for key, (types, said) in _KEY_TYPES.items():
        value = config.get(key)
        wrong_bool = isinstance(value, bool) and bool not in types  # JSON true is no integer
        if key in config and (wrong_bool or not isinstance(value, types)):
            raise MicroGPTError(f"{path}: {key} must be {said}, got {_shown(value)}")
    extra = config.get("microgpt", {})
    for key in ("model_config", "tokenizer"):
        if key in extra and not isinstance(extra[key], dict):
            raise MicroGPTError(f"{path}: microgpt.{key} must be an object, got {_shown(extra[key])}")


def _shown(value: Any) -> str:
    """A config value as JSON, cut short (a hostile file may hold a 400-digit number)."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _model_config(config: dict[str, Any], directory: Path) -> ModelConfig:
    """The ModelConfig of a transformers GPT-2 config, or one line naming what cannot be represented."""
    ours = config.get("microgpt", {}).get("model_config")
    if isinstance(ours, dict):  # export --format hf: the exact settings ride along
        try:
            return ModelConfig(**ours)
        except (TypeError, ValueError, MicroGPTError) as exc:
            raise MicroGPTError(f"{directory / CONFIG_FILE}: invalid microgpt model_config: {exc}") from None
    problems = []
    if config.get("model_type") != "gpt2":
        problems.append(f"model_type {config.get('model_type')!r} (only gpt2 is supported)")
    activation = config.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS:
        problems.append(f"activation_function {activation!r} (supported: {', '.join(_ACTIVATIONS)})")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if config.get(flag):
            problems.append(f"{flag} (a scaled attention variant)")
    if not config.get("scale_attn_weights", True):
        problems.append("scale_attn_weights false")
    if not config.get("tie_word_embeddings", True):
        problems.append("an untied head (tie_word_embeddings false)")
    n_embd, n_inner = config.get("n_embd"), config.get("n_inner")
    if n_inner is not None and n_inner != 4 * (n_embd or 0):
        problems.append(f"n_inner {_shown(n_inner)} (microgpt's feed-forward is 4 x n_embd)")
    epsilon = config.get("layer_norm_epsilon", 1e-5)
    # an int (maybe past any float) is never 1e-5; `not <=` also refuses NaN, which Python's json reads
    if isinstance(epsilon, int) or not abs(epsilon - 1e-5) <= 1e-12:
        problems.append(f"layer_norm_epsilon {_shown(epsilon)} (microgpt's LayerNorm uses 1e-5)")
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and vocab < GPT2_END_OF_TEXT + 1:
        problems.append(f"vocab_size {vocab} (smaller than GPT-2's {GPT2_END_OF_TEXT + 1:,} tokens)")
    if problems:
        raise MicroGPTError(f"{directory} holds a model microgpt cannot represent: {'; '.join(problems)}")
    try:
        return ModelConfig(vocab_size=config["vocab_size"], n_layer=config["n_layer"], n_head=config["n_head"],
                           n_embed=config["n_embd"], context=config["n_positions"], dropout=0.0, position="learned",
                           norm="layernorm",
                           activation=_ACTIVATIONS[activation], qk_norm=False, tie_weights=True, bias=True)
    except KeyError as exc:
        raise MicroGPTError(f"{directory / CONFIG_FILE} lacks {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise MicroGPTError(f"{directory / CONFIG_FILE}: {exc}") from None


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (directory / WEIGHTS_FILE).exists():
        try:
            return load_file(directory / WEIGHTS_FILE)
        except (SafetensorError, OSError, ValueError) as exc:
            raise MicroGPTError(f"{directory / WEIGHTS_FILE} is not a readable safetensors file (truncated or "
                                f"corrupted?): {str(exc)[:200]}") from None
    legacy = directory / "pytorch_model.bin"
    if legacy.exists():
        state = checkpoint.load_weights_only(legacy, what="PyTorch weights file")
        if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
            return state
        raise MicroGPTError(f"{legacy} does not hold a plain dict of tensors")
    raise MicroGPTError(f"{directory} has neither {WEIGHTS_FILE} nor pytorch_model.bin")


def _from_gpt2_names(weights: dict[str, torch.Tensor], config: ModelConfig, directory: Path) -> dict[str, torch.Tensor]:
    """GPT-2's tensor names (with or without the `transformer.` prefix) -> ours; Conv1D weights
    transposed. GPT-2's attention-mask buffers (h.N.attn.bias, h.N.attn.masked_bias: constants in
    older files, not weights) are left out."""
    plain = {k.removeprefix("transformer."): v for k, v in weights.items()}
    layers = {int(m.group(1)) for k in plain if (m := re.match(r"h\.(\d+)\.", k))}
    if layers and max(layers) >= config.n_layer:
        raise MicroGPTError(f"{directory / CONFIG_FILE} says n_layer {config.n_layer}, but the weights hold "
                            f"{max(layers) + 1} layers (h.0 to h.{max(layers)}); importing would drop the rest")
    try:
        state = {"tok_emb.weight": plain["wte.weight"], "pos_emb.weight": plain["wpe.weight"],
                 "norm.weight": plain["ln_f.weight"], "norm.bias": plain["ln_f.bias"]}
        for i in range(config.n_layer):
            for ours, theirs in GPT2_BLOCK_NAMES.items():
                tensor = plain[f"h.{i}.{theirs}"]
                state[block_param(i, ours)] = tensor.t().contiguous() if tensor.dim() == 2 else tensor
    except KeyError as exc:
        raise MicroGPTError(f"{directory} lacks the tensor {exc.args[0]}: not a complete GPT-2") from None
    if config.tie_weights:
        state["head.weight"] = state["tok_emb.weight"]
    elif "lm_head.weight" in weights:  # an untied microgpt model exported as hf
        state["head.weight"] = weights["lm_head.weight"]
    else:
        raise MicroGPTError(f"{directory} lacks lm_head.weight for its untied head")
    # Before .float() would turn int8 weights into plausible floats; by the file's own names.
    check_tensors({k: v for k, v in weights.items() if not _MASK_BUFFER.search(k)}, str(directory))
    return {k: v.float() for k, v in state.items()}
