"""Build the model of a run: load (quantizing on load), attach LoRA, prepare for training."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype a run computes in under autocast (CUDA only), or None for no autocast."""
    return PRECISIONS[precision] if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The loop's autocast context (off when dtype is None). Its cache of cast weights is off: every
    adapter weight is cast once per forward anyway, and the cache would keep a 16-bit copy of all of
    them until the forward ends (0.47 GiB for LoRA r=64 on a 13B model)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False)


def ensure_built(cfg) -> None:
    """For model.build (e.g. "tiny-llama"), create the model directory once, atomically."""
    if cfg.build is None or os.path.isfile(os.path.join(cfg.name, "config.json")):
        return
    from .hf.tiny import build_tiny_model

    if cfg.build != "tiny-llama":
        raise ValueError(f"model.build {cfg.build!r} is not supported; allowed: tiny-llama")
    parent = os.path.dirname(os.path.abspath(cfg.name))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=parent)
    try:
        with torch.random.fork_rng(devices=[]):  # building must not move the run's random stream
            build_tiny_model(tmp, "llama", hidden=256, layers=4)
        os.replace(tmp, cfg.name)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(cfg.name, "config.json")):  # not built by a concurrent run either
            raise


def load_model(cfg, device: torch.device):
    """(peft model ready to train, tokenizer) for the run config `cfg`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf import QuantConfig, prepare_for_training
    from .hf.training import (draws_random, embeddings_to_host, fuse_lora_output, fuse_rmsnorm, fuse_rope,
                              fuse_swiglu, keep_adapter_inputs)
    from .nn.dropout import use_hash_dropout
    from .hf.config import parse_dtype
    from .quant.codes import FLOAT_DTYPES

    ensure_built(cfg.model)
    dtype = parse_dtype(cfg.model.dtype, "model.dtype", FLOAT_DTYPES)
    kwargs = dict(revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code, dtype=dtype,
                  device_map={"": device})
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    q = cfg.quant
    if q.enabled:
        kwargs["quantization_config"] = QuantConfig(
            quant_type=q.quant_type, double_quant=q.double_quant, compute_dtype=q.compute_dtype or cfg.model.dtype,
            blocksize=q.blocksize, quant_storage=q.quant_storage,
            skip_modules=list(q.skip_modules) if q.skip_modules is not None else None)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name, **kwargs)
    if q.enabled and q.decode_in_pieces:
        from .nn import Linear4bit

        for m in model.modules():
            if isinstance(m, Linear4bit):
                m.decode_in_pieces = True
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name, revision=cfg.model.revision,
                                              trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.model.host_embeddings and device.type == "cuda":
        trained = {*cfg.lora.target_modules, *(cfg.lora.modules_to_save or [])}
        moved = embeddings_to_host(model, head="lm_head" not in trained)
        if len(moved) < 2:
            print(f"model.host_embeddings: moved to host memory: {', '.join(moved) or 'nothing'} (tied, trained "
                  "or not plain embedding/linear tables stay on the GPU)", flush=True)
    # LoRA's dropout is hashed (qtune.nn.dropout): where the base model draws no random numbers,
    # checkpointing keeps no generator state, which lets the loop capture its step as a CUDA graph
    rng_free = not draws_random(model)
    model = prepare_for_training(model, gradient_checkpointing=cfg.train.gradient_checkpointing,
                                 preserve_rng_state=not rng_free)
    targets = list(cfg.lora.target_modules)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets,
                      modules_to_save=list(cfg.lora.modules_to_save) if cfg.lora.modules_to_save else None,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if autocast_dtype_for(cfg.train.precision, device) is not None:  # the loop runs under autocast
        keep_adapter_inputs(model)
    fuse_lora_output(model)
    fuse_rmsnorm(model)
    fuse_rope(model)
    fuse_swiglu(model)
    model.qtune_dropout_seed = use_hash_dropout(model)
    model.qtune_rng_free = rng_free
    return model, tokenizer
