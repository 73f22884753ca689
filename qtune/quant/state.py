"""QuantState: everything besides the packed nibbles that a 4-bit tensor needs to be decoded,
with bitsandbytes' state-dict layout so checkpoints move between the two libraries."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from .codes import BLOCKSIZES, FLOAT_DTYPES, NESTED_BLOCKSIZE, QUANT_TYPES, code_table, dynamic_map

_PACKED_KEY = "quant_state.bitsandbytes__"
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: object, what: str) -> torch.dtype:
    if name not in _DTYPE_NAMES:
        raise ValueError(f"quant state {what} {name!r} is not supported; allowed: {', '.join(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[name]


@dataclass
class NestedState:
    """Double quantization of the absmax: 8-bit codes (held in QuantState.absmax) decode to
    code[q] * absmax[q_index // blocksize] + offset."""

    absmax: torch.Tensor  # float32, one per block of `blocksize` first-level absmax values
    code: torch.Tensor  # float32 (256,), the signed dynamic map
    offset: torch.Tensor  # float32 scalar: the mean of the first-level absmax
    blocksize: int = NESTED_BLOCKSIZE


@dataclass
class QuantState:
    """Metadata of one 4-bit tensor: per-block absmax, code table, original shape and dtype."""

    absmax: torch.Tensor  # float32 (n_blocks,), or uint8 codes when nested
    shape: torch.Size
    dtype: torch.dtype  # dtype of the tensor that was quantized; the default dequantize dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor  # float32 (16,)
    nested: NestedState | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nested_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(nested absmax, nested code, offset) as the kernels take them, or None."""
        n = self.nested
        return None if n is None else (n.absmax, n.code, n.offset)

    def to(self, device: torch.device | str) -> QuantState:
        """A copy with every tensor on `device` (dtypes never change)."""
        nested = self.nested and replace(
            self.nested, absmax=self.nested.absmax.to(device), code=self.nested.code.to(device),
            offset=self.nested.offset.to(device))
        return replace(self, absmax=self.absmax.to(device), code=self.code.to(device), nested=nested)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under bitsandbytes' keys (without the `weight.` prefix), non-tensor fields packed
        as UTF-8 JSON in `quant_state.bitsandbytes__<quant_type>`."""
        meta: dict[str, object] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        out = {"absmax": self.absmax, "quant_map": self.code.clone()}
        if self.nested is not None:
            out["nested_absmax"] = self.nested.absmax
            out["nested_quant_map"] = self.nested.code.clone()
            meta.update(nested_blocksize=self.nested.blocksize, nested_dtype="float32",
                        nested_offset=float(self.nested.offset))
        out[_PACKED_KEY + self.quant_type] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], device: torch.device | str | None = None) -> QuantState:
        """Inverse of `to_dict`; keys may carry any prefix (e.g. `model.x.weight.absmax`).

        Raises ValueError naming the field when the entries do not form a consistent state.
        """
        d = {k.rsplit(".", 1)[-1] if _PACKED_KEY not in k else k[k.index(_PACKED_KEY):]: v for k, v in d.items()}
        packed = [k for k in d if k.startswith(_PACKED_KEY)]
        if len(packed) != 1:
            raise ValueError(f"quant state needs exactly one '{_PACKED_KEY}<nf4|fp4>' entry; found {packed or 'none'}")
        try:
            meta = json.loads(bytes(d[packed[0]].cpu().to(torch.uint8).tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"quant state entry {packed[0]!r} is not UTF-8 JSON: {e}") from None
        quant_type = meta.get("quant_type")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant state quant_type {quant_type!r} is not supported; allowed: {', '.join(QUANT_TYPES)}")
        if packed[0] != _PACKED_KEY + quant_type:
            raise ValueError(f"quant state key {packed[0]!r} does not match its quant_type {quant_type!r}")
        blocksize = meta.get("blocksize")
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"quant state blocksize {blocksize!r} is not allowed; allowed: {BLOCKSIZES}")
        dtype = _parse_dtype(meta.get("dtype"), "dtype")
        shape = meta.get("shape")
        if not isinstance(shape, list) or not shape or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"quant state shape {shape!r} is not a list of positive integers")
        for key in ("absmax", "quant_map"):
            if key not in d:
                raise ValueError(f"quant state is missing '{key}'")
        code = d["quant_map"]
        if code.shape != (16,) or not torch.equal(code.cpu().float(), code_table(quant_type)):
            raise ValueError(f"quant state quant_map does not match the {quant_type} code table")
        state = cls(absmax=d["absmax"], shape=torch.Size(shape), dtype=dtype, blocksize=blocksize,
                    quant_type=quant_type, code=code_table(quant_type))
        nested_keys = {"nested_absmax", "nested_quant_map"} & d.keys()
        if nested_keys or "nested_offset" in meta:
            state.nested = cls._nested_from(d, meta, state.n_blocks)
        want_dtype = torch.uint8 if state.nested else torch.float32
        if state.absmax.dtype != want_dtype or state.absmax.numel() != state.n_blocks:
            raise ValueError(
                f"quant state absmax has {state.absmax.numel()} values of {state.absmax.dtype}; shape {shape} at "
                f"blocksize {blocksize} needs {state.n_blocks} of {want_dtype}")
        state.absmax = state.absmax.reshape(-1)
        return state.to(device) if device is not None else state

    @staticmethod
    def _nested_from(d: dict[str, torch.Tensor], meta: dict, n_blocks: int) -> NestedState:
        for key in ("nested_absmax", "nested_quant_map"):
            if key not in d:
                raise ValueError(f"quant state is double-quantized but is missing '{key}'")
        for key in ("nested_blocksize", "nested_offset", "nested_dtype"):
            if key not in meta:
                raise ValueError(f"quant state is double-quantized but its JSON lacks '{key}'")
        bs = meta["nested_blocksize"]
        if bs != NESTED_BLOCKSIZE:
            raise ValueError(f"quant state nested_blocksize {bs!r} is not supported; allowed: {NESTED_BLOCKSIZE}")
        if _parse_dtype(meta["nested_dtype"], "nested_dtype") != torch.float32:
            raise ValueError(f"quant state nested_dtype {meta['nested_dtype']!r} is not supported; allowed: float32")
        code = d["nested_quant_map"]
        if code.shape != (256,) or not torch.equal(code.cpu().float(), dynamic_map(True)):
            raise ValueError("quant state nested_quant_map does not match the signed 8-bit dynamic map")
        absmax = d["nested_absmax"]
        want = -(-n_blocks // bs)
        if absmax.dtype != torch.float32 or absmax.numel() != want:
            raise ValueError(f"quant state nested_absmax has {absmax.numel()} values of {absmax.dtype}; "
                             f"needs {want} of torch.float32")
        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=absmax.device)
        return NestedState(absmax=absmax.reshape(-1), code=code.float(), offset=offset, blocksize=bs)


def check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in FLOAT_DTYPES:
        names = ", ".join(dtype_name(t) for t in FLOAT_DTYPES)
        raise TypeError(f"{what} dtype {dtype_name(dtype)} is not supported; allowed: {names}")
