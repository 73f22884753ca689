"""qtune.loss.causal_lm_loss: the value and the gradients of `model(**batch).loss`, without the full
logits; LoRA on lm_head, lm_head in modules_to_save, other architectures, packed batches, the
quantized model as qtune.train loads it, the fallback."""

from types import SimpleNamespace

import pytest
import torch
from conftest import rel_err
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from qtune.data import collate
from qtune.hf import prepare_for_training
from qtune.loss import causal_lm_loss

TOL = 1e-5


def peft_model(path, targets=("all-linear",), modules_to_save=None, quantization_config=None):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=quantization_config)
    model = prepare_for_training(model, gradient_checkpointing=True)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,  # B != 0: A gets gradients
                      target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
                      modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    return model


def make_batch(vocab=100, b=2, t=37, seed=1):
    """Prompt positions and right padding masked out of the labels, as qtune's collate leaves them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (b, t), generator=g)
    labels, attn = ids.clone(), torch.ones(b, t, dtype=torch.long)
    labels[:, :9] = -100
    attn[1, -6:], labels[1, -6:], ids[1, -6:] = 0, -100, 0
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks (OPT's config has dropout 0.1)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(model, batch, chunk=None, static=False):
    ref, ref_g = loss_and_grads(model, lambda: model(**batch).loss)
    got, got_g = loss_and_grads(model, lambda: causal_lm_loss(model, batch, chunk=chunk, static=static))
    assert abs(float(got) - float(ref)) / abs(float(ref)) < TOL, (float(got), float(ref))
    assert ref_g.keys() == got_g.keys() and ref_g
    for name, g in ref_g.items():
        assert got_g[name] is not None and rel_err(got_g[name], g) < TOL, (name, rel_err(got_g[name], g))
    return ref_g


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("static", [False, True])
def test_matches_hf_loss_and_lora_gradients(tiny_dir, chunk, static):
    model = peft_model(tiny_dir("llama"))
    grads = assert_same(model, make_batch(), chunk, static)
    assert all(float(g.abs().sum()) > 0 for g in grads.values())


def test_lora_on_lm_head(tiny_dir):
    model = peft_model(tiny_dir("llama"), targets=["q_proj", "down_proj", "lm_head"])
    grads = assert_same(model, make_batch(), chunk=5)
    assert any("lm_head.lora_A" in n for n in grads) and any("lm_head.lora_B" in n for n in grads)


def test_lm_head_in_modules_to_save(tiny_dir):
    """The tiny recipe's setting: the whole output layer trains."""
    model = peft_model(tiny_dir("llama"), modules_to_save=["lm_head"])
    grads = assert_same(model, make_batch(), chunk=16)
    assert any("lm_head.modules_to_save" in n for n in grads)


@pytest.mark.parametrize("arch", ["mistral", "opt", "gpt_neox"])
def test_other_architectures(tiny_dir, arch):
    assert_same(peft_model(tiny_dir(arch)), make_batch(), chunk=8)


def test_packed_batch(tiny_dir):
    """4-D block-diagonal mask and restarting position ids, as data.packing=true gives them."""
    rows = [{"input_ids": list(range(10, 40)), "labels": [-100] * 5 + list(range(15, 40)),
             "position_ids": list(range(12)) + list(range(18)), "segment": [0] * 12 + [1] * 18},
            {"input_ids": list(range(50, 70)), "labels": list(range(50, 70)),
             "position_ids": list(range(20)), "segment": [0] * 20}]
    batch = collate(rows, pad_id=0)
    assert batch["attention_mask"].dim() == 4
    assert_same(peft_model(tiny_dir("llama")), batch, chunk=8)
    assert_same(peft_model(tiny_dir("llama")), batch, chunk=8, static=True)  # logits at every position


def test_quantized_model_as_qtune_train_loads_it(tiny_dir):
    from omegaconf import OmegaConf

    from qtune.config import RunConfig
    from qtune.model import load_model

    cfg = OmegaConf.structured(RunConfig)
    cfg.model.name, cfg.model.dtype, cfg.lora.dropout = tiny_dir("llama"), "float32", 0.0
    torch.manual_seed(0)
    model, _ = load_model(cfg, torch.device("cpu"))
    for n, p in model.named_parameters():  # LoRA B starts at zero: give A gradients to compare
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    assert_same(model, make_batch(), chunk=8)


def test_logits_only_a_chunk_at_a_time_and_only_for_labelled_positions(tiny_dir):
    model = peft_model(tiny_dir("llama"))
    batch = make_batch()
    rows = []
    hook = model.get_base_model().lm_head.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    causal_lm_loss(model, batch, chunk=8).backward()
    hook.remove()
    n_valid = int((batch["labels"][:, 1:] != -100).sum())
    assert max(rows) <= 8 and sum(rows) == n_valid  # no recomputation in backward either


def test_no_grad_and_all_ignored(tiny_dir):
    model = peft_model(tiny_dir("llama"))
    batch = make_batch()
    with torch.no_grad():
        ref, got = model(**batch).loss, causal_lm_loss(model, batch, chunk=8)
    assert not got.requires_grad and abs(float(got) - float(ref)) / float(ref) < TOL
    batch["labels"][:] = -100
    with torch.no_grad():
        assert torch.isnan(model(**batch).loss) and torch.isnan(causal_lm_loss(model, batch))
        assert torch.isnan(causal_lm_loss(model, batch, static=True))


def test_bf16_autocast(tiny_dir):
    model = peft_model(tiny_dir("llama"))
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = model(**batch).loss, causal_lm_loss(model, batch, chunk=8)
    assert got.dtype == torch.float32 and abs(float(got.detach()) - float(ref.detach())) / float(ref.detach()) < 1e-2


def test_falls_back_for_models_it_does_not_know():
    calls = []

    class Custom(torch.nn.Module):
        def forward(self, **kw):
            calls.append(sorted(kw))
            return SimpleNamespace(loss=torch.tensor(3.0))

    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long)}
    assert float(causal_lm_loss(Custom(), batch)) == 3.0 and calls == [["input_ids", "labels"]]


def test_falls_back_for_unknown_batch_keys(tiny_dir):
    model = peft_model(tiny_dir("llama"))
    batch = make_batch()
    seen = []
    hook = model.get_base_model().lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    batch["num_items_in_batch"] = torch.tensor(10)
    with torch.no_grad():
        loss = causal_lm_loss(model, batch)
    hook.remove()
    assert len(seen) == 1 and seen[0][:2] == batch["input_ids"].shape  # HF's own forward: full logits
    assert torch.isfinite(loss)


def test_falls_back_under_fsdp2_root(tiny_dir):
    """fully_shard turns the root's class into FSDP<class>: its forward hooks gather the root-level
    weights (lm_head among them), so the root's own forward must run."""
    from torch.distributed.fsdp import FSDPModule

    model = peft_model(tiny_dir("llama"))
    model.__class__ = type("FSDP" + type(model).__name__, (FSDPModule, type(model)), {})
    batch = make_batch()
    seen = []
    hook = model.get_base_model().lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        causal_lm_loss(model, batch)
    hook.remove()
    assert len(seen) == 1 and seen[0][:2] == batch["input_ids"].shape
