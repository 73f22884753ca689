"""QuantConfig: the transformers quantization config of qtune, accepting bitsandbytes' names too."""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..quant.codes import FLOAT_DTYPES
from ..quant.functional import STORAGE_DTYPES, check_quant_args
from ..quant.state import dtype_name

QUANT_METHOD = "qtune"

# bitsandbytes' name -> qtune's name, so that migrating from BitsAndBytesConfig is a one-line change.
ALIASES = {
    "bnb_4bit_quant_type": "quant_type",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype",
    "bnb_4bit_quant_storage": "quant_storage",
    "llm_int8_skip_modules": "skip_modules",
}
DEFAULTS: dict[str, Any] = {
    "load_in_4bit": True,
    "load_in_8bit": False,
    "quant_type": "nf4",
    "double_quant": False,
    "compute_dtype": None,  # None: the dtype the model is loaded in
    "quant_storage": torch.uint8,
    "blocksize": 64,
    "skip_modules": None,  # None: transformers' default (output embeddings, tied weights)
    "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_threshold": 6.0,
    "llm_int8_has_fp16_weight": False,
}
_SERIALIZED_ONLY = {"quant_method", "bits", "_load_in_4bit", "_load_in_8bit"}  # read back from to_dict()/bnb dicts
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "uint8": torch.uint8}


def parse_dtype(value: Any, what: str, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    """A torch.dtype from a dtype or its name ("bfloat16", "bf16", "torch.bfloat16", ...)."""
    dtype = value if isinstance(value, torch.dtype) else _DTYPE_NAMES.get(str(value).removeprefix("torch."))
    if dtype not in allowed:
        raise ValueError(f"{what} {value!r} is not supported; allowed: {', '.join(dtype_name(t) for t in allowed)}")
    return dtype


class QuantConfig(QuantizationConfigMixin):
    """How `from_pretrained` quantizes a model with qtune: `quantization_config=qtune.QuantConfig(...)`.

    Takes qtune's names (`quant_type`, `double_quant`, `compute_dtype`, `quant_storage`, `blocksize`,
    `skip_modules`) and bitsandbytes' (`bnb_4bit_quant_type`, `bnb_4bit_use_double_quant`,
    `bnb_4bit_compute_dtype`, `bnb_4bit_quant_storage`, `llm_int8_skip_modules`). Unlike
    bitsandbytes, the default type is NF4 and the default compute dtype is the model's dtype.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        opts = dict(DEFAULTS)
        given: dict[str, tuple[str, Any]] = {}  # option -> (the name it was given under, value)
        for key, value in kwargs.items():
            if key == "bits":
                if value not in (4, 8):
                    raise ValueError(f"bits {value!r} is not supported; allowed: 4, 8")
                key, value = ("load_in_4bit", True) if value == 4 else ("load_in_8bit", True)
            elif key in _SERIALIZED_ONLY:
                continue
            name = ALIASES.get(key, key)
            if name not in DEFAULTS:
                raise TypeError(f"QuantConfig got an unknown option {key!r}; allowed: {', '.join([*DEFAULTS, *ALIASES])}")
            if value is None and name not in ("compute_dtype", "skip_modules"):
                continue  # None selects the default
            if name in given and given[name][1] != value:
                raise ValueError(f"QuantConfig got {given[name][0]}={given[name][1]!r} and {key}={value!r}; "
                                 f"they name the same option, give one")
            given[name] = (key, value)
            opts[name] = value
        if opts["load_in_8bit"] and "load_in_4bit" not in given:
            opts["load_in_4bit"] = False
        self._set(opts)

    def _set(self, o: dict[str, Any]) -> None:
        if o["load_in_4bit"] and o["load_in_8bit"]:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive; set one of them")
        if not (o["load_in_4bit"] or o["load_in_8bit"]):
            raise ValueError("QuantConfig needs load_in_4bit=True (the default) or load_in_8bit=True")
        check_quant_args(o["quant_type"], o["blocksize"])
        self.load_in_4bit, self.load_in_8bit = bool(o["load_in_4bit"]), bool(o["load_in_8bit"])
        self.quant_type, self.blocksize, self.double_quant = o["quant_type"], o["blocksize"], bool(o["double_quant"])
        self.compute_dtype = None if o["compute_dtype"] is None else parse_dtype(
            o["compute_dtype"], "compute_dtype", FLOAT_DTYPES)
        self.quant_storage = parse_dtype(o["quant_storage"], "quant_storage", STORAGE_DTYPES)
        skip = o["skip_modules"]
        if isinstance(skip, str):
            skip = [skip]
        self.skip_modules = None if skip is None else list(skip)
        self.llm_int8_enable_fp32_cpu_offload = bool(o["llm_int8_enable_fp32_cpu_offload"])
        self.llm_int8_threshold = float(o["llm_int8_threshold"])
        self.llm_int8_has_fp16_weight = bool(o["llm_int8_has_fp16_weight"])

    # bitsandbytes' names, read-only, for code that inspects a BitsAndBytesConfig
    bnb_4bit_quant_type = property(lambda self: self.quant_type)
    bnb_4bit_use_double_quant = property(lambda self: self.double_quant)
    bnb_4bit_compute_dtype = property(lambda self: self.compute_dtype)
    bnb_4bit_quant_storage = property(lambda self: self.quant_storage)
    llm_int8_skip_modules = property(lambda self: self.skip_modules)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as written to config.json. No `load_in_4bit` key: transformers reads that as
        a bitsandbytes config."""
        return {
            "quant_method": QUANT_METHOD,
            "bits": 8 if self.load_in_8bit else 4,
            "llm_int8_threshold": self.llm_int8_threshold,
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "double_quant": self.double_quant,
            "compute_dtype": None if self.compute_dtype is None else dtype_name(self.compute_dtype),
            "quant_storage": dtype_name(self.quant_storage),
            "skip_modules": copy.copy(self.skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
        }

    def __iter__(self):
        yield from self.to_dict().items()

    def to_bnb_dict(self) -> dict[str, Any]:
        """The same settings as transformers' BitsAndBytesConfig writes them, for a checkpoint that
        transformers + bitsandbytes load."""
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
            "_load_in_4bit": self.load_in_4bit,
            "_load_in_8bit": self.load_in_8bit,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": dtype_name(self.compute_dtype or torch.float32),
            "bnb_4bit_quant_storage": dtype_name(self.quant_storage),
            "llm_int8_skip_modules": copy.copy(self.skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
        }

    @classmethod
    def from_bnb(cls, bnb: Any) -> QuantConfig:
        """A QuantConfig with the settings of a BitsAndBytesConfig (object or dict)."""
        d = bnb if isinstance(bnb, dict) else bnb.to_dict()
        keep = {k: v for k, v in d.items() if k in ALIASES or k in DEFAULTS}
        return cls(**keep)

