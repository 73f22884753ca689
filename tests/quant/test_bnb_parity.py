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
    # NF4 from 16-bit weights matches exactly. Otherwise every differing code is a value within
    # 4 float32 ulps of a rounding threshold, where bitsandbytes' fast-math reciprocal rounds the
    # other way (FP4's threshold 0.0859375 = 11/128 is hit exactly by bf16/fp16 grids): < 0.1%.
    if quant_type == "nf4" and dtype != torch.float32:
        assert r["diff_bytes"] == 0, r
    assert r["diff_codes_not_near_tie"] == 0, r
    assert r["diff_bytes"] <= r["bytes"] // 1000, r
    if double_quant:
        assert r["diff_nested_absmax"] == 0 and r["diff_offset"] == 0, r
        assert r["diff_absmax_codes"] <= 4, r
    else:
        assert r["diff_absmax"] == 0, r


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dicts_load_both_ways(parity, quant_type, double_quant):
    r = parity.interop(quant_type, double_quant)
    assert r["bnb_to_qtune_exact"] and r["qtune_to_bnb_exact"], r
    assert r["forward_rel_diff"] < 1e-2, r
