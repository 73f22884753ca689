"""Launch on the tensors' own GPU: Triton launches on the current CUDA device, so a launcher called
with tensors on another GPU (a model split over GPUs by a device map) makes that GPU current."""

from __future__ import annotations

import functools

import torch


def on_tensor_device(launcher):
    """Decorate a launcher whose first argument is a tensor: run it with that tensor's CUDA device
    current (a no-op when it already is, or for CPU tensors under the interpreter)."""

    @functools.wraps(launcher)
    def run(t: torch.Tensor, *args, **kwargs):
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return launcher(t, *args, **kwargs)
        return launcher(t, *args, **kwargs)

    return run
