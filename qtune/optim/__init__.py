"""Blockwise 8-bit Adam and AdamW."""

from .adamw8bit import Adam8bit, AdamW8bit

__all__ = ["Adam8bit", "AdamW8bit"]
