"""The training loop, its config, and atomic checkpoints."""
