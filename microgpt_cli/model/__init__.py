"""The GPT module, and its int8 form for inference on CPU."""
