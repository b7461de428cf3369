"""microgpt: train small GPT language models on your own text, evaluate them, sample from them.

The Python API mirrors the CLI: `prepare`, `train`, `evaluate`, `evaluate_tasks` (lm-evaluation-harness
tasks), `load_checkpoint`, `generate_text`, `generate_texts` (a batch), `stream_text`, `load_sampler` (a
Sampler to draw from many times), `Scorer` (log-probabilities of given tokens) and `chat` (a reply to
messages, with a chat model's template).
They are imported lazily so that `microgpt --help` does not wait for torch.
"""

from __future__ import annotations

from importlib import import_module

# `microgpt` imports this package before it can handle a Ctrl-C: nothing slow to import here, not
# even typing (mypy takes any name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "prepare": "microgpt_cli.data.dataprep",
    "train": "microgpt_cli.training.loop",
    "evaluate": "microgpt_cli.infer.evaluation",
    "evaluate_tasks": "microgpt_cli.infer.evaluation",
    "load_checkpoint": "microgpt_cli.io.checkpoint",
    "generate_text": "microgpt_cli.infer.sampling",
    "stream_text": "microgpt_cli.infer.sampling",
    "generate_texts": "microgpt_cli.infer.sampling",
    "load_sampler": "microgpt_cli.infer.sampling",
    "chat": "microgpt_cli.infer.chat",
    "Sampler": "microgpt_cli.infer.sampling",
    "Scorer": "microgpt_cli.infer.scoring",
    "ModelConfig": "microgpt_cli.config",
    "TrainConfig": "microgpt_cli.config",
    "GPT": "microgpt_cli.model.gpt",
    "MicroGPTError": "microgpt_cli.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'microgpt_cli' has no attribute {name!r}")
