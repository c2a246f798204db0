"""Checkpointing, configuration, logging and distributed helpers."""
