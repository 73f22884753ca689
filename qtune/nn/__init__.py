"""Quantized layers and their autograd Functions."""

from .convert import quantize_linears
from .linear4bit import Linear4bit, Matmul4bit, matmul_4bit
from .linear8bit import Linear8bit

__all__ = ["Linear4bit", "Linear8bit", "Matmul4bit", "matmul_4bit", "quantize_linears"]
