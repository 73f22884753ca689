"""Frozen embedding tables kept in pinned host memory, read by the GPU over the bus: the input
embedding (rows gathered per batch by a Triton kernel, kernels/embedding.py) and an untied output
layer (its rows streamed in pieces, with the cross-entropy computed piece by piece). The GPU holds no
copy of either (a 13B Llama's: 0.31 GiB each), and CUDA graphs can capture both. `F.embedding` and
`F.linear` on the same table are the references."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.functional import use_kernel


def _pinned(weight: torch.Tensor) -> torch.Tensor:
    weight = weight.detach().to("cpu").contiguous()
    return weight.pin_memory() if torch.cuda.is_available() else weight


def _gather(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight[ids] on ids' device: the kernel reads the host table directly."""
    if use_kernel(ids):
        from ..kernels import embedding

        return embedding.gather_rows(ids, weight)
    return F.embedding(ids.to("cpu"), weight).to(ids.device)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul with x runs in: autocast's on a GPU under autocast, else x's."""
    return torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype


class HostEmbedding(nn.Module):
    """nn.Embedding's forward over a frozen table held on the host (pinned when CUDA is there).
    The table is a buffer, not a parameter, so `model.device` stays the GPU's."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", _pinned(weight))
        self.num_embeddings, self.embedding_dim = self.weight.shape
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> HostEmbedding:
        return cls(emb.weight, emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _gather(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on host"


class HostHead(nn.Module):
    """A frozen, bias-free output layer (nn.Linear(D, V)) held on the host. Its forward streams
    PIECE rows of the table at a time to the GPU; `cross_entropy_sum` gives the loss and its input
    gradient in one pass over the table (online log-sum-exp), for qtune.loss."""

    PIECE = 4096  # vocabulary rows per piece (40 MiB of a 5120-wide fp16 table)

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", _pinned(weight))
        self.out_features, self.in_features = self.weight.shape
        self._ids: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> HostHead:
        return cls(linear.weight)

    def _pieces(self, device: torch.device, dtype: torch.dtype):
        """(first row, the piece's rows on `device` in `dtype`) over the table."""
        if device not in self._ids:  # row indices, made once (outside any graph capture)
            self._ids[device] = torch.arange(self.out_features, device=device)
        ids = self._ids[device]
        for v0 in range(0, self.out_features, self.PIECE):
            yield v0, _gather(ids[v0: v0 + self.PIECE], self.weight).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_kernel(x):
            return F.linear(x, self.weight.to(x.device, x.dtype))
        dtype = _compute_dtype(x)
        x = x.to(dtype)
        out = torch.empty(*x.shape[:-1], self.out_features, dtype=dtype, device=x.device)
        for v0, w in self._pieces(x.device, dtype):
            out[..., v0: v0 + w.shape[0]] = F.linear(x, w)
        return out

    def cross_entropy_sum(self, hidden: torch.Tensor, targets: torch.Tensor, need_grad: bool,
                          ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sum over rows of CE(hidden @ W^T, targets) in float32, its float32 gradient for hidden or
        None); rows whose target is ignore_index add nothing. hidden (T, D), targets (T,)."""
        dtype = _compute_dtype(hidden)
        h = hidden.to(dtype)
        T = h.shape[0]
        m = torch.full((T,), float("-inf"), dtype=torch.float32, device=h.device)
        s = torch.zeros(T, dtype=torch.float32, device=h.device)
        picked = torch.zeros(T, dtype=torch.float32, device=h.device)
        acc = torch.zeros(T, self.in_features, dtype=torch.float32, device=h.device) if need_grad else None
        safe = targets.clamp(0, self.out_features - 1)
        for v0, w in self._pieces(h.device, dtype):
            logits = F.linear(h, w).float()
            new_m = torch.maximum(m, logits.amax(1))
            scale = torch.exp(m - new_m)  # rescales what is summed so far to the new running max
            e = torch.exp(logits - new_m[:, None])
            s.mul_(scale).add_(e.sum(1))
            if acc is not None:
                acc.mul_(scale[:, None]).add_(e.to(dtype) @ w)
            m = new_m
            local = safe - v0
            inside = (local >= 0) & (local < w.shape[0])
            picked = picked + torch.where(inside, logits.gather(1, local.clamp(0, w.shape[0] - 1)[:, None])[:, 0], 0.0)
        valid = targets != ignore_index
        total = torch.where(valid, m + torch.log(s) - picked, 0.0).sum()
        grad = None
        if acc is not None:  # softmax @ W - W[target]
            target_rows = _gather(safe, self.weight).to(dtype).float()
            grad = torch.where(valid[:, None], acc / s[:, None] - target_rows, 0.0)
        return total, grad

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, on host"
