"""Checkpoints of a training run: adapter, optimizer (8-bit states), scheduler, grad scaler, RNG
states and data position, written atomically (a temporary directory renamed into place); the
last K are kept."""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from .atomic import atomic_dir

CKPT = re.compile(r"^step_(\d{7})$")


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output_dir: str, step: int, model, state: dict, keep_last: int, adapter_state: dict | None = None) -> str:
    """Write checkpoints/step_NNNNNNN (adapter/ in peft's format + state.pt) atomically; prune.
    `adapter_state`: the trainable weights gathered whole (fsdp); default: the model's own."""
    root = checkpoint_dir(output_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:07d}")
    with atomic_dir(final) as tmp:
        model.save_pretrained(os.path.join(tmp, "adapter"), state_dict=adapter_state)
        torch.save({**state, "step": step, "rng": rng_state()}, os.path.join(tmp, "state.pt"))
    for old in sorted(d for d in os.listdir(root) if CKPT.match(d))[:-keep_last or None]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest(output_dir: str) -> str | None:
    root = checkpoint_dir(output_dir)
    if not os.path.isdir(root):
        return None
    found = sorted(d for d in os.listdir(root) if CKPT.match(d))
    return os.path.join(root, found[-1]) if found else None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint directory to resume from, or None; ValueError for a path without one."""
    if resume is None or resume == "":
        return None
    if resume == "auto":
        return latest(output_dir)
    if os.path.isdir(resume) and not os.path.isfile(os.path.join(resume, "state.pt")):
        inner = latest(resume)  # a run directory: take its latest checkpoint
        if inner:
            return inner
    if not os.path.isfile(os.path.join(resume, "state.pt")):
        raise ValueError(f"train.resume={resume} holds no checkpoint (state.pt); give a checkpoints/step_* "
                         f"directory, a run directory, or auto")
    return resume


def load(path: str, model, device: torch.device) -> dict:
    """Restore the adapter weights into `model` and return the saved state (RNG not yet applied)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = os.path.join(path, "adapter", "adapter_model.safetensors")
    set_peft_model_state_dict(model, load_file(adapter, device=str(device)))
    return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
