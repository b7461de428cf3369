"""Text to token ids and back: tokenizers, writing data dirs (prepare) and reading them (dataset)."""
