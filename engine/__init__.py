"""The training engine: config, data, objectives, training loop, checkpoints, CLI."""

__version__ = "0.1.0"
