"""QuantState serialization in bitsandbytes' layout, and the errors of quantize/from_dict."""

import json

import pytest
import torch
from conftest import one_line
from safetensors.torch import load_file, save_file

from qtune.quant import QuantState, dequantize_4bit, quantize_4bit


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_to_dict_keys_and_json(quant_type, double_quant):
    _, state = quantize_4bit(torch.randn(300, 64, dtype=torch.bfloat16), 128, quant_type, double_quant)
    d = state.to_dict()
    keys = {"absmax", "quant_map", f"quant_state.bitsandbytes__{quant_type}"}
    if double_quant:
        keys |= {"nested_absmax", "nested_quant_map"}
    assert set(d) == keys
    meta = json.loads(bytes(d[f"quant_state.bitsandbytes__{quant_type}"].tolist()))
    want = {"quant_type": quant_type, "blocksize": 128, "dtype": "bfloat16", "shape": [300, 64]}
    if double_quant:
        want |= {"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": float(state.nested.offset)}
    assert meta == want
    assert list(meta) == list(want)  # bitsandbytes' key order, so the JSON bytes match too


@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_through_safetensors_is_bit_exact(tmp_path, double_quant):
    w = torch.randn(257, 96)
    packed, state = quantize_4bit(w, 64, "nf4", double_quant)
    save_file({"weight": packed, **{"weight." + k: v for k, v in state.to_dict().items()}}, tmp_path / "m.safetensors")
    loaded = load_file(tmp_path / "m.safetensors")
    state2 = QuantState.from_dict({k: v for k, v in loaded.items() if k != "weight"})
    assert torch.equal(loaded["weight"], packed)
    assert torch.equal(state2.absmax, state.absmax) and state2.shape == state.shape and state2.dtype == state.dtype
    if double_quant:
        assert torch.equal(state2.nested.absmax, state.nested.absmax)
        assert state2.nested.offset.view(torch.int32) == state.nested.offset.view(torch.int32)
    assert torch.equal(dequantize_4bit(loaded["weight"], state2), dequantize_4bit(packed, state))


def _dict(double_quant=True):
    _, state = quantize_4bit(torch.randn(64, 64), 64, "nf4", double_quant)
    return state.to_dict()


def _with_meta(d, **change):
    key = "quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(d[key].tolist())) | change
    return d | {key: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}


@pytest.mark.parametrize("mutate,match", [
    (lambda d: {k: v for k, v in d.items() if k != "absmax"}, "missing 'absmax'"),
    (lambda d: {k: v for k, v in d.items() if not k.startswith("quant_state")}, "exactly one"),
    (lambda d: {k: v for k, v in d.items() if k != "nested_absmax"}, "missing 'nested_absmax'"),
    (lambda d: d | {"absmax": d["absmax"][:-1]}, "absmax has 63 values"),
    (lambda d: d | {"quant_map": d["quant_map"] * 2}, "quant_map does not match"),
    (lambda d: d | {"quant_state.bitsandbytes__nf4": torch.tensor([255, 0], dtype=torch.uint8)}, "not UTF-8 JSON"),
    (lambda d: _with_meta(d, blocksize=48), "blocksize 48 is not allowed"),
    (lambda d: _with_meta(d, quant_type="fp4"), "does not match its quant_type 'fp4'"),
    (lambda d: _with_meta(d, quant_type="int4"), "quant_type 'int4' is not supported; allowed: nf4, fp4"),
    (lambda d: _with_meta(d, dtype="int8"), "dtype 'int8' is not supported"),
    (lambda d: _with_meta(d, shape=[64, 65]), "needs 65 of torch.uint8"),
    (lambda d: _with_meta(d, nested_blocksize=128), "nested_blocksize 128"),
])
def test_mismatched_state_errors(mutate, match):
    with pytest.raises(ValueError) as e:
        QuantState.from_dict(mutate(_dict()))
    assert match in one_line(e)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(quant_type="nf5"), ValueError, "quant_type 'nf5' is not supported; allowed: nf4, fp4"),
    (dict(blocksize=48), ValueError, "blocksize 48 is not allowed; allowed: 32, 64"),
    (dict(blocksize=8192), ValueError, "blocksize 8192 is not allowed"),
    (dict(blocksize=True), ValueError, "blocksize True is not allowed"),
    (dict(quant_storage=torch.int32), TypeError, "quant_storage torch.int32 is not supported"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc) as e:
        quantize_4bit(torch.randn(64, 64), **kwargs)
    assert match in one_line(e)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float64, torch.bool])
def test_non_float_weights_are_refused(dtype):
    with pytest.raises(TypeError) as e:
        quantize_4bit(torch.ones(64, 64, dtype=dtype), name="w")
    assert "w dtype" in one_line(e) and "allowed: float32, float16, bfloat16" in str(e.value)


@pytest.mark.parametrize("bad,count", [([float("nan")], 1), ([float("inf"), float("-inf"), float("nan")], 3)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_non_finite_weights_are_refused_with_a_count(bad, count, double_quant):
    w = torch.randn(128, 64)
    idx = torch.randperm(w.numel())[: len(bad)]
    w.view(-1)[idx] = torch.tensor(bad)
    with pytest.raises(ValueError) as e:
        quantize_4bit(w, double_quant=double_quant, name="layers.0.mlp.up_proj.weight")
    msg = one_line(e)
    assert msg.startswith(f"layers.0.mlp.up_proj.weight has {count} non-finite value") and "of 8192" in msg


def test_empty_tensor_is_refused():
    with pytest.raises(ValueError) as e:
        quantize_4bit(torch.empty(0, 64))
    assert "empty" in one_line(e)
