"""Training: the distillation loop, the data pipeline, checkpoints and GGUF export."""
