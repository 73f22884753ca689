"""Datasets -> formatted, tokenized, masked (and optionally packed) training examples."""

from .pipeline import DataError, Example, build_datasets, collate, pack

__all__ = ["DataError", "Example", "build_datasets", "collate", "pack"]
