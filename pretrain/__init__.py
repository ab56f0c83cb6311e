"""Pretraining hybrid decoder language models."""

__version__ = "0.1.0"
