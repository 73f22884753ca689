"""QuantConfig: qtune names, bitsandbytes aliases, serialization, errors."""

import pytest
import torch
from conftest import one_line
from transformers import BitsAndBytesConfig

from qtune import QuantConfig

BNB_ARGS = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)


def test_bitsandbytes_arguments_mean_the_same():
    c = QuantConfig(**BNB_ARGS)
    assert (c.quant_type, c.double_quant, c.compute_dtype, c.quant_storage) == ("nf4", True, torch.bfloat16, torch.uint8)
    assert c.bnb_4bit_compute_dtype == torch.bfloat16 and c.load_in_4bit
    assert QuantConfig(quant_type="nf4", double_quant=True, compute_dtype="bf16").to_dict() == c.to_dict()
    assert QuantConfig.from_bnb(BitsAndBytesConfig(**BNB_ARGS)).to_dict() == c.to_dict()


def test_round_trip_through_dict_has_no_bitsandbytes_marker():
    c = QuantConfig(quant_type="fp4", blocksize=128, quant_storage=torch.bfloat16, skip_modules=["mlp"])
    d = c.to_dict()
    assert d["quant_method"] == "qtune" and "load_in_4bit" not in d and "load_in_8bit" not in d
    assert QuantConfig.from_dict(d).to_dict() == d
    bnb = c.to_bnb_dict()
    assert bnb["quant_method"] == "bitsandbytes" and bnb["load_in_4bit"] and bnb["bnb_4bit_quant_type"] == "fp4"
    assert QuantConfig.from_bnb(bnb).quant_storage == torch.bfloat16


@pytest.mark.parametrize("kwargs,match", [
    (dict(quant_type="nf5"), "quant_type 'nf5' is not supported; allowed: nf4, fp4"),
    (dict(bnb_4bit_quant_type="int4"), "quant_type 'int4' is not supported"),
    (dict(load_in_4bit=True, load_in_8bit=True), "load_in_4bit and load_in_8bit are exclusive"),
    (dict(load_in_4bit=False), "needs load_in_4bit=True (the default) or load_in_8bit=True"),
    (dict(blocksize=100), "blocksize 100 is not allowed"),
    (dict(compute_dtype="int8"), "compute_dtype 'int8' is not supported; allowed: float32, float16, bfloat16"),
    (dict(quant_type="nf4", bnb_4bit_quant_type="fp4"), "quant_type='nf4' and bnb_4bit_quant_type='fp4'"),
    (dict(bits=3), "bits 3 is not supported"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError) as e:
        QuantConfig(**kwargs)
    assert match in one_line(e)


def test_unknown_option():
    with pytest.raises(TypeError) as e:
        QuantConfig(bnb_4bit_quant_typ="nf4")
    assert "unknown option 'bnb_4bit_quant_typ'" in one_line(e)
