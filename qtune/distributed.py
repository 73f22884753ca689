"""Data parallelism over torch.distributed (as started by `torchrun` or `accelerate launch`): each
rank holds the quantized model and a replica of the LoRA weights and 8-bit optimizer states; the
LoRA gradients are averaged with one flat all-reduce per step; rank 0 logs and writes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Group:
    """The process group of this run: world 1 (no torch.distributed) unless launched with several."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """Each rank its own GPU (LOCAL_RANK)."""
        if self.world > 1 and requested.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return requested

    def broadcast_params(self, params: list[torch.Tensor]) -> None:
        """Start every rank from rank 0's LoRA weights."""
        if self.world > 1:
            for p in params:
                dist.broadcast(p.data, 0)

    def average_grads(self, params: list[torch.Tensor]) -> None:
        """Mean of the gradients over ranks, in one flat all-reduce."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t) / self.world

    def gather(self, value: float) -> list[float]:
        if self.world == 1:
            return [value]
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        out = [torch.zeros_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [float(x) for x in out]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
