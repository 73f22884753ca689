"""Loading bitsandbytes 4-bit checkpoints into qtune layers, and exporting qtune models in the
layout that transformers + bitsandbytes load."""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from ..atomic import atomic_dir
from ..nn.linear4bit import Linear4bit
from ..nn.linear8bit import Linear8bit
from .config import QuantConfig


def from_pretrained(path: str | os.PathLike, quantization_config: QuantConfig | None = None, *,
                    model_class: Any = None, **kwargs) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained` that also reads checkpoints saved by transformers +
    bitsandbytes (4-bit or 8-bit), into qtune's layers (the tensors share one layout; only the config
    differs). Any other checkpoint loads as with transformers, quantized by `quantization_config`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(
        path, trust_remote_code=kwargs.get("trust_remote_code", False))
    saved = getattr(config, "quantization_config", None)
    saved = saved if isinstance(saved, dict) or saved is None else saved.to_dict()
    if saved and saved.get("quant_method") == "bitsandbytes":
        qc = QuantConfig.from_bnb(saved)
        if quantization_config is not None and quantization_config.compute_dtype is not None:
            qc.compute_dtype = quantization_config.compute_dtype  # a loading attribute, as in transformers
        config.quantization_config = qc.to_dict()
        return model_class.from_pretrained(path, config=config, **kwargs)
    return model_class.from_pretrained(path, config=config, quantization_config=quantization_config, **kwargs)


def _unquantized_linears(model: nn.Module) -> list[str]:
    return sorted(name for name, m in model.named_modules() if type(m) is nn.Linear)


def export_bitsandbytes(model: nn.Module, out_dir: str | os.PathLike, *, overwrite: bool = False,
                        **save_kwargs) -> str:
    """Save a qtune-quantized transformers model so that `from_pretrained` with transformers +
    bitsandbytes (no qtune) loads it: qtune's tensors, a bitsandbytes quantization config. The
    directory appears whole or not at all."""
    qc = getattr(model.config, "quantization_config", None)
    if not isinstance(qc, QuantConfig):
        raise ValueError("export_bitsandbytes needs a model loaded with quantization_config=qtune.QuantConfig(...)")
    if not any(isinstance(m, (Linear4bit, Linear8bit)) for m in model.modules()):
        raise ValueError("export_bitsandbytes: the model holds no qtune Linear4bit or Linear8bit layer")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        with open(os.path.join(tmp, "config.json")) as f:
            config = json.load(f)
        bnb = qc.to_bnb_dict()
        bnb["llm_int8_skip_modules"] = _unquantized_linears(model)  # exactly the layers kept in float
        config["quantization_config"] = bnb
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return out_dir
