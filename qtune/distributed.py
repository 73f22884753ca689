"""Several processes over torch.distributed (as started by `torchrun` or `accelerate launch`).

- `ddp`: each rank holds the quantized model and a replica of the LoRA weights and 8-bit optimizer
  states; the LoRA gradients are averaged with one flat all-reduce per step; rank 0 logs and writes.
- `fsdp`: FSDP2 (`fully_shard`) per decoder layer and on the root: every parameter, the packed
  4-bit base weights included, is sharded along dim 0 and all-gathered just in time; LoRA gradients
  are reduce-scattered by FSDP, so each rank's optimizer holds states for its own shards only. The
  QuantStates (absmax etc.) are plain attributes, replicated on every rank.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


STRATEGIES = ("ddp", "fsdp")


class Group:
    """The process group of this run: world 1 (no torch.distributed) unless launched with several."""

    def __init__(self, strategy: str = "ddp") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"train.strategy={strategy!r} is not supported; allowed: {', '.join(STRATEGIES)}")
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # FSDP on one process would shard nothing: it runs as plain single-process training
        self.fsdp = strategy == "fsdp" and self.world > 1
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

    def check_model(self, model: nn.Module, device: torch.device) -> None:
        """One-line ValueError for a model this strategy cannot spread over ranks."""
        if self.world == 1:
            return
        offloaded = sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}
                           & {"cpu", "disk"})
        if offloaded and device.type != "cpu":
            raise ValueError(f"a device map that offloads modules to {'/'.join(offloaded)} cannot be trained with "
                             f"{'fsdp' if self.fsdp else 'ddp'} over {self.world} ranks; give each rank the whole "
                             f"model on its GPU (or use train.strategy=fsdp to shard it)")
        if self.fsdp:
            from .nn import Linear8bit

            if any(isinstance(m, Linear8bit) for m in model.modules()):
                raise ValueError("train.strategy=fsdp does not support 8-bit base weights (load_in_8bit); use "
                                 "4-bit (nf4/fp4) weights or train.strategy=ddp")

    def shard(self, model: nn.Module, device: torch.device) -> None:
        """fsdp: FSDP2 `fully_shard` on each decoder layer (the classes in transformers'
        `_no_split_modules`), then on the root; in place. Call after LoRA is attached and every rank
        holds the same weights. No mixed-precision policy: autocast computes as in the ddp path and
        gradients are reduced in the LoRA parameters' own dtype. Every rank has loaded the whole
        quantized model before this (loading is not sharded). On CUDA, notes the memory allocated
        once the model is ready (for `memory_record`)."""
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world,))
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            blocks = set(getattr(base, "_no_split_modules", None) or ())
            for layer in [m for m in model.modules() if type(m).__name__ in blocks]:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            self.setup_gib = torch.cuda.memory_allocated(device) / 2**30

    def full_trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """fsdp: the trainable parameters gathered whole (a collective: every rank calls it), on
        the CPU of rank 0, keyed as in model.state_dict(); None elsewhere and for ddp."""
        if not self.fsdp:
            return None
        _reshard(model)
        out = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                full = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
                if self.main:
                    out[name] = full.cpu()
        return out if self.main else None

    def gather_states(self, state: dict) -> list[dict] | None:
        """fsdp: every rank's (optimizer) state dict, moved to the CPU, in a list on rank 0."""
        state = _to_cpu(state)
        out = [None] * self.world if self.main else None
        dist.gather_object(state, out, dst=0)
        return out

    def optimizer_state(self, saved: dict) -> dict:
        """This rank's optimizer state from a checkpoint: the replica (ddp, one process) or its own
        shard (fsdp, which resumes only on as many fsdp ranks as wrote it)."""
        shards = saved.get("optimizer_shards")
        if shards is None and self.fsdp:
            raise ValueError("this checkpoint was written by a ddp or single-process run; resume it with "
                             "train.strategy=ddp (fsdp resumes fsdp checkpoints on the same number of ranks)")
        if shards is not None and (not self.fsdp or len(shards) != self.world):
            now = f"{self.world} fsdp ranks" if self.fsdp else f"{self.world} ddp rank{'s' if self.world > 1 else ''}"
            raise ValueError(f"this checkpoint's optimizer states are sharded over {len(shards)} fsdp ranks; resume "
                             f"it with train.strategy=fsdp on {len(shards)} ranks (now: {now})")
        return shards[self.rank] if shards is not None else saved["optimizer"]

    def memory_record(self, model: nn.Module, device: torch.device) -> dict:
        """Lists indexed by rank: bytes of the packed 4-bit weights each rank holds (its shards
        under fsdp), bytes of all its parameters and quant states, and on CUDA the GPU memory
        allocated once the model was ready (`rank_setup_gpu_mem_gib`) and the peak allocated since
        the start, loading included (`rank_peak_gpu_mem_gib`), in GiB. A collective."""
        from .nn import Linear4bit

        _reshard(model)
        packed = states = 0
        for m in model.modules():
            if isinstance(m, Linear4bit) and m.is_quantized:
                packed += _nbytes(m.weight)
                states += sum(_nbytes(t) for t in m.quant_state.to_dict().values())
        params = sum(_nbytes(p) for p in model.parameters())
        rec = {"rank_base_weight_bytes": [int(b) for b in self.gather(float(packed))],
               "rank_model_bytes": [int(b) for b in self.gather(float(params + states))]}
        if device.type == "cuda":
            rec["rank_setup_gpu_mem_gib"] = self.gather(getattr(self, "setup_gib", 0.0))
            rec["rank_peak_gpu_mem_gib"] = self.gather(torch.cuda.max_memory_allocated(device) / 2**30)
        return rec

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the gradients' global norm to max_norm; the norm before clipping, as a 0-d tensor
        (read it only when logging: no host sync per step). Sharded (DTensor) gradients give a partial
        norm per rank, made whole with one all-reduce."""
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def average_grads(self, params: list[torch.Tensor]) -> None:
        """ddp: mean of the gradients over ranks, in one flat all-reduce (fsdp: FSDP's
        reduce-scatter has already averaged them)."""
        if self.world == 1 or self.fsdp:
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


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _nbytes(t: torch.Tensor) -> int:
    """Bytes this rank holds of `t` (its local shard for a DTensor)."""
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def _reshard(model: nn.Module) -> None:
    """Put an FSDP2 model's parameters back in their sharded form: the root keeps its own gathered
    after a forward without backward (evaluation)."""
    if hasattr(model, "reshard"):
        model.reshard()
