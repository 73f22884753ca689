"""qtune's transformers quantizer: swaps eligible nn.Linear layers for Linear4bit before loading,
quantizes each weight as it arrives (one tensor at a time, on its target device), and reads
pre-quantized checkpoints in bitsandbytes' layout."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from ..nn.linear4bit import Linear4bit
from ..nn.linear8bit import Linear8bit

QUANTIZED = (Linear4bit, Linear8bit)
from .config import QUANT_METHOD, QuantConfig

try:  # transformers' own skip-list matching, so skip lists mean what they mean for bitsandbytes
    from transformers.quantizers.quantizers_utils import should_convert_module
except ImportError:  # pragma: no cover - older transformers
    def should_convert_module(full_name: str, patterns: list[str] | None = None) -> bool:
        return not patterns or not any(full_name == p or full_name.endswith("." + p) or
                                       full_name.startswith(p + ".") for p in patterns)

SERIALIZED_KEYS = [
    "weight.nested_absmax", "weight.nested_quant_map", "weight.quant_map", "weight.absmax",
    "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4", "weight",
]


def replace_linears(model: nn.Module, config: QuantConfig, skip: list[str]) -> list[str]:
    """Swap every nn.Linear whose name `skip` does not match for an unquantized Linear4bit (or, with
    load_in_8bit, Linear8bit) shell
    (same device and dtype, usually meta); returns the names swapped."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not should_convert_module(name, skip):
            continue
        w = module.weight
        if config.load_in_8bit:
            shell = Linear8bit(module.in_features, module.out_features, bias=module.bias is not None,
                               threshold=config.llm_int8_threshold, device=w.device, dtype=w.dtype)
        else:
            shell = Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                               quant_type=config.quant_type, blocksize=config.blocksize,
                               double_quant=config.double_quant, compute_dtype=config.compute_dtype,
                               quant_storage=config.quant_storage, device=w.device, dtype=w.dtype)
        shell.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, shell)
        swapped.append(name)
    return swapped


class QtuneQuantize(ConversionOps):
    """A float weight arriving for a Linear4bit shell: quantize it where it lies."""

    def __init__(self, hf_quantizer: QtuneHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None,
                model: nn.Module | None = None, **kwargs) -> dict[str, torch.Tensor]:
        result = {}
        for param_name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, param_name)
            module.quantize_(value, param_name)
            module._is_hf_initialized = True
            result[param_name] = module.weight
            if isinstance(module, Linear8bit):  # its buffers are made here too: not "missing" from the checkpoint
                prefix = param_name.removesuffix("weight")
                result[prefix + "SCB"], result[prefix + "weight_format"] = module.SCB, module.weight_format
        return result


class QtuneDeserialize(ConversionOps):
    """A packed weight and its quant-state tensors (bitsandbytes' keys) for one Linear4bit."""

    def __init__(self, hf_quantizer: QtuneHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None,
                full_layer_name: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        if len(input_dict) == 1:  # a plain weight that the pattern also matches (norms, lm_head, ...)
            return input_dict
        tensors = {k: v[0] if isinstance(v, list) else v for k, v in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
        if not isinstance(module, Linear4bit):
            raise ValueError(f"{full_layer_name} holds a 4-bit weight but {type(module).__name__} is not quantized "
                             f"here; check skip_modules against the checkpoint's")
        packed = tensors.pop("weight")
        module.load_quantized(packed, tensors, full_layer_name)
        module._is_hf_initialized = True
        return {"weight": module.weight}


class QtuneHfQuantizer(HfQuantizer):
    """Quantize-on-load and pre-quantized loading for `QuantConfig` (quant_method "qtune")."""

    requires_calibration = False
    requires_parameters_quantization = True
    quantization_config: QuantConfig

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and not self.quantization_config.llm_int8_enable_fp32_cpu_offload:
            values = {str(v) for v in device_map.values()}
            if values != {"cpu"} and values & {"cpu", "disk"}:
                raise ValueError("device_map puts some modules on the CPU or disk next to GPU ones; to keep those "
                                 "unquantized there, pass QuantConfig(llm_int8_enable_fp32_cpu_offload=True)")

    def update_device_map(self, device_map):
        if device_map is None:
            device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
        return device_map

    def adjust_max_memory(self, max_memory):
        return {key: val * 0.90 for key, val in max_memory.items()}  # room for quantization's temporaries

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, QUANTIZED) and name == "weight"

    @property
    def quantized_element_size(self) -> float:
        return 1.0 if self.quantization_config.load_in_8bit else 0.5

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        if self.param_needs_quantization(model, param_name):
            return self.quantized_element_size
        return param.element_size()

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        cfg = self.quantization_config
        skip = self.get_modules_to_not_convert(model, cfg.skip_modules, getattr(model, "_keep_in_fp32_modules", None))
        if cfg.llm_int8_enable_fp32_cpu_offload and isinstance(device_map, dict):
            skip += [k for k, v in device_map.items() if str(v) in ("cpu", "disk")]
        names = [n for n, _ in model.named_modules()]
        for pattern in cfg.skip_modules or []:
            if all(should_convert_module(n, [pattern]) for n in names):
                warnings.warn(f"skip_modules entry {pattern!r} matches no module of {type(model).__name__}", stacklevel=2)
        self.modules_to_not_convert = skip
        replace_linears(model, cfg, skip)
        return model

    def get_quantize_ops(self):
        return QtuneQuantize(self)

    def get_weight_conversions(self):
        if not self.pre_quantized or self.quantization_config.load_in_8bit:  # 8-bit: weight and SCB load as is
            return []
        return [WeightConverter(source_patterns=list(SERIALIZED_KEYS), target_patterns="weight",
                                operations=[QtuneDeserialize(self)])]

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, module in model.named_modules():  # any weight that bypassed the quantize op
            if isinstance(module, QUANTIZED) and not module.is_quantized and module.weight.device.type != "meta":
                module.quantize_(name=f"{name}.weight")
        if self.quantization_config.load_in_8bit:  # what peft and Trainer look for
            model.is_loaded_in_8bit = True
        else:
            model.is_loaded_in_4bit = True
        devices = {p.device for p in model.parameters()}
        if not hasattr(model, "hf_device_map") and len(devices) == 1:  # transformers sets it for multi-device maps
            (device,) = devices
            if device.type != "cpu":  # {"": "cpu"} would read as CPU offload to save_pretrained
                model.hf_device_map = {"": device.index if device.type == "cuda" else str(device)}
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        for name, module in list(model.named_modules()):
            if isinstance(module, QUANTIZED):
                lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                device=module.weight.device, dtype=dtype or module.weight_dtype)
                with torch.no_grad():
                    lin.weight.copy_(module.dequantize(lin.weight.dtype))
                    if module.bias is not None:
                        lin.bias.copy_(module.bias)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, lin)
        return model


def register() -> None:
    """Make quant_method "qtune" known to transformers (idempotent)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer)

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QtuneHfQuantizer)
