"""A frozen input embedding whose table stays in pinned host memory: rows are gathered straight
from there by a Triton kernel (kernels/embedding.py), so the table costs no GPU memory (a 13B
Llama's: 0.31 GiB) and a CUDA graph can still capture the lookup. `F.embedding` is the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.functional import use_kernel


class HostEmbedding(nn.Module):
    """nn.Embedding's forward over a frozen table held on the host (pinned when CUDA is there).
    The table is a buffer, not a parameter, so `model.device` stays the GPU's."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        weight = weight.detach().to("cpu").contiguous()
        self.register_buffer("weight", weight.pin_memory() if torch.cuda.is_available() else weight)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> HostEmbedding:
        return cls(emb.weight, emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if use_kernel(ids):
            from ..kernels import embedding

            return embedding.gather_rows(ids, self.weight)
        return F.embedding(ids.to("cpu"), self.weight).to(ids.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on host"
