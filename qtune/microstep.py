"""The training loop's hot path: forward, loss and backward of one micro-batch, run eagerly or
replayed from a CUDA graph.

At batch 1 on one GPU a QLoRA step is bound by the host (Python and launches for hundreds of
modules, three passes with gradient checkpointing), not by the GPU. Recorded once into a CUDA graph
and replayed, a micro-batch costs the host a few input copies and one launch. Capture needs: the
same batch shape every micro-batch (packed batches padded to seq_len), no host synchronisation
inside the step (the static-shape loss), no random-generator state saved by checkpointing (LoRA's
hash dropout, `preserve_rng_state=False`), and gradients that exist before capture and are zeroed
in place afterwards (`set_to_none` False), so that replays accumulate into them.
"""

from __future__ import annotations

import contextlib

import torch

from .hf.training import unpacked_search_off
from .loss import causal_lm_loss
from .model import autocast

WARMUP = 2  # eager micro-batches before capture: kernels compiled, workspaces and gradients allocated


def attention_for(batch: dict, device: torch.device):
    """Batches without an attention mask (whole causal rows) may use cuDNN's attention, which
    qtune.train otherwise turns off (it builds a plan per mask shape): at one fixed shape it is the
    fastest kernel on Hopper (a 13B-shaped step at 4,096 tokens: 96.8 ms with it, 123.3 without)."""
    if device.type != "cuda" or "attention_mask" in batch:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH], set_priority=True)


class MicroSteps:
    """`steps(batch)` runs one micro-batch (gradients accumulate into the parameters' `.grad`) and
    returns its loss, detached, on the device. With `graphs`, the micro-batches after WARMUP are
    replays of a graph captured from the first of them; a batch of another shape runs eagerly. If
    capture fails, it says so in one line and stays eager."""

    def __init__(self, model, scaler, grad_accum: int, device: torch.device, autocast_dtype,
                 seed: torch.Tensor | None = None, seed_stride: int = 1, graphs: bool = False) -> None:
        self.model, self.scaler, self.grad_accum, self.device = model, scaler, grad_accum, device
        self.autocast_dtype, self.seed, self.seed_stride = autocast_dtype, seed, seed_stride
        self.graphs = graphs and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.graphs else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.loss: torch.Tensor | None = None
        self.eager_runs = 0

    @property
    def set_to_none(self) -> bool:
        """How the optimizer must zero the gradients: in place while graphs are on."""
        return not self.graphs

    def run(self, batch: dict) -> torch.Tensor:
        """The micro-step itself (also what a graph records)."""
        if self.seed is not None:
            self.seed.add_(self.seed_stride)  # a new dropout mask per micro-batch
        with attention_for(batch, self.device):  # forward and backward, recomputation included
            with autocast(self.device, self.autocast_dtype):
                loss = causal_lm_loss(self.model, batch, static=self.graphs)
            self.scaler.scale(loss / self.grad_accum).backward()
        return loss.detach()

    def __call__(self, batch: dict) -> torch.Tensor:
        if not self.graphs:
            return self.run(batch)
        if self.graph is None and self.eager_runs >= WARMUP:
            self._capture(batch)
        if self.graph is not None and self._fits(batch):
            for k, v in batch.items():
                self.inputs[k].copy_(v, non_blocking=True)
            self.graph.replay()
            return self.loss.clone()
        self.eager_runs += 1
        # on the capture stream: what capture will need (workspaces, per-stream buffers) exists there
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            loss = self.run(batch)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return loss

    def _fits(self, batch: dict) -> bool:
        return batch.keys() == self.inputs.keys() and all(
            v.shape == self.inputs[k].shape and v.dtype == self.inputs[k].dtype for k, v in batch.items())

    def _capture(self, batch: dict) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:  # replays add into these; a gradient made during capture would be overwritten
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.inputs = {k: v.clone() for k, v in batch.items()}
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        try:
            with torch.cuda.graph(graph, stream=self.stream), unpacked_search_off(batch):
                self.loss = self.run(self.inputs)
        except Exception as e:  # noqa: BLE001 - any failure: say why in one line and train eagerly
            self.graphs, self.inputs, self.loss = False, {}, None
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            print(f"cuda graphs off: capture failed ({type(e).__name__}: {msg}); training continues eagerly",
                  flush=True)
            return
        self.graph = graph
        torch.cuda.empty_cache()  # the eager steps' cached blocks: the graph has its own pool now

