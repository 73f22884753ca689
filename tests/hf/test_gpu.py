"""GPU: checkpoints against transformers + bitsandbytes, device maps, generate (skip without CUDA)."""

import pytest
import torch
from conftest import lora_losses, rel_err
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import qtune
from qtune import Linear4bit, QuantConfig

pytestmark = pytest.mark.gpu
BNB_ARGS = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    from qtune.hf.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("bf16"), "llama", dtype=torch.bfloat16, hidden=256)


def _bnb_weights(model):
    import bitsandbytes as bnb

    return {n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _qtune_weights(model):
    return {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def test_bitsandbytes_checkpoint_loads_in_qtune_and_back(bf16_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    bnb_model = AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=BitsAndBytesConfig(**BNB_ARGS),
                                                     device_map={"": 0})
    bnb_model.save_pretrained(tmp_path / "bnb")
    q = qtune.from_pretrained(tmp_path / "bnb", device_map={"": 0})
    wb, wq = _bnb_weights(bnb_model), _qtune_weights(q)
    assert wb.keys() == wq.keys() and all(torch.equal(wb[k], wq[k]) for k in wb)
    x = torch.randint(4, 99, (2, 32), device="cuda")
    with torch.no_grad():
        lb, lq = bnb_model(x).logits.float(), q(x).logits.float()
    print(f"\nbnb checkpoint -> qtune: logits rel diff {rel_err(lq, lb):.2e}")
    assert rel_err(lq, lb) < 2e-2  # same weights; bf16 matmuls computed by different kernels

    # qtune's own quantization, exported, loaded by transformers + bitsandbytes
    own = AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=QuantConfig(**BNB_ARGS),
                                               device_map={"": 0})
    qtune.export_bitsandbytes(own, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export", device_map={"": 0})
    wb, wq = _bnb_weights(back), _qtune_weights(own)
    assert wb.keys() == wq.keys() and all(torch.equal(wb[k], wq[k]) for k in wb)
    with torch.no_grad():
        lb, lq = back(x).logits.float(), own(x).logits.float()
    print(f"qtune export -> bnb: logits rel diff {rel_err(lq, lb):.2e}")
    assert rel_err(lq, lb) < 2e-2


def test_device_maps_and_offload(bf16_dir):
    model = AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=QuantConfig(**BNB_ARGS),
                                                 device_map="auto")
    # one GPU: all of it there; several: accelerate spreads the layers, each quantized, and run, on its
    # own GPU (Triton launches on the current device: the kernels make the tensors' device current)
    devices = set(model.hf_device_map.values())
    assert devices == {0} if torch.cuda.device_count() == 1 else devices <= set(range(torch.cuda.device_count()))
    assert all(p.device.type == "cuda" for p in model.parameters())
    tok = AutoTokenizer.from_pretrained(bf16_dir)
    ids = tok("Hello my name is", return_tensors="pt").to(0)
    assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 4
    device_map = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": 0, "model.rotary_emb": 0,
                  "lm_head": "cpu"}
    with pytest.raises(ValueError, match="llm_int8_enable_fp32_cpu_offload"):
        AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=QuantConfig(**BNB_ARGS),
                                             device_map=device_map)
    model = AutoModelForCausalLM.from_pretrained(
        bf16_dir, quantization_config=QuantConfig(**BNB_ARGS, llm_int8_enable_fp32_cpu_offload=True),
        device_map=device_map)
    assert type(model.lm_head) is nn.Linear and model.hf_device_map["lm_head"] == "cpu"
    assert all(m.weight.device.type == "cuda" for m in model.modules() if isinstance(m, Linear4bit))
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8


def test_lora_train_and_generate_on_cuda(bf16_dir):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16,
                                                 quantization_config=QuantConfig(**BNB_ARGS), device_map={"": 0})
    peft_model = get_peft_model(qtune.prepare_for_training(model), LoraConfig(r=8, target_modules="all-linear"))
    x = torch.tensor([[1] + [4 + (7 * i + j) % 90 for i in range(64)] for j in range(4)], device="cuda")
    losses = lora_losses(peft_model, x, steps=10)
    assert losses[-1] < 0.9 * losses[0], losses
    peft_model.eval()
    out = peft_model.generate(input_ids=x[:1, :8], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 14)


def test_quantize_on_load_never_holds_the_whole_model_in_bf16(tmp_path):
    """Peak GPU memory while loading stays far below the bf16 model: weights are quantized one
    tensor at a time as they arrive."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=2048, intermediate_size=5504, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    with torch.device("cuda"):
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    bf16_bytes = sum(p.numel() * 2 for p in LlamaForCausalLM(config).parameters())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map={"": 0},
                                                 quantization_config=QuantConfig(**BNB_ARGS))
    peak = torch.cuda.max_memory_allocated() - base
    held = torch.cuda.memory_allocated() - base
    print(f"\nload: bf16 model {bf16_bytes / 2**20:.0f} MiB, peak while loading {peak / 2**20:.0f} MiB, "
          f"held after {held / 2**20:.0f} MiB")
    assert held < 0.35 * bf16_bytes and peak < 0.6 * bf16_bytes
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 8 * 7
