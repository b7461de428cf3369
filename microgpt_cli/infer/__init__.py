"""Inference on a trained model: the engine (ids in, logits and samples out), text sampling and exact evaluation."""
