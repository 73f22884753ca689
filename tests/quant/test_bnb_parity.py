"""GPU: qtune's 4-bit bytes and state dicts against bitsandbytes (skips without CUDA or bitsandbytes)."""

import importlib.util
import pathlib

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def parity():
    pytest.importorskip("bitsandbytes")
    path = pathlib.Path(__file__).parents[2] / "scripts" / "bnb_parity.py"
    spec = importlib.util.spec_from_file_location("bnb_parity", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bytes_match_bitsandbytes(parity, dtype, blocksize, quant_type, double_quant):
    r = parity.compare((4096, 4096), dtype, blocksize, quant_type, double_quant)
    # Every differing code is a value within 4 ulps of a rounding threshold (bitsandbytes'
    # fast-math reciprocal); such ties are rare: at most 1 in 100,000 bytes.
    assert r["diff_codes_not_near_tie"] == 0, r
    assert r["diff_bytes"] <= r["bytes"] // 100_000, r
    if double_quant:
        assert r["diff_nested_absmax"] == 0 and r["diff_offset"] == 0, r
        assert r["diff_absmax_codes"] <= 2, r
    else:
        assert r["diff_absmax"] == 0, r


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dicts_load_both_ways(parity, quant_type, double_quant):
    r = parity.interop(quant_type, double_quant)
    assert r["bnb_to_qtune_exact"] and r["qtune_to_bnb_exact"], r
    assert r["forward_rel_diff"] < 1e-2, r
