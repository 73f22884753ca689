"""Host-memory embedding: the gather kernel vs F.embedding, and the swap in a Llama model."""

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err

from qtune.kernels.embedding import gather_rows
from qtune.nn.embedding import HostEmbedding, HostHead


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [7, 1024, 1500])  # under, at and across the kernel's row chunk
def test_gather_matches_embedding(dtype, dim):
    torch.manual_seed(dim)
    weight = torch.randn(50, dim).to(dtype)
    ids = torch.randint(0, 50, (3, 11))
    out = gather_rows(ids, weight)
    assert out.shape == (3, 11, dim) and out.dtype == dtype
    assert torch.equal(out, F.embedding(ids, weight))  # a copy: exact


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_llama_with_host_embeddings_gives_the_same_logits(tiny_dir, monkeypatch, backend):
    from transformers import AutoModelForCausalLM

    from qtune.hf.training import embeddings_to_host

    monkeypatch.setenv("QTUNE_BACKEND", backend)
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    moved = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    moved.config.tie_word_embeddings = False
    assert embeddings_to_host(moved) == ["input", "output"]
    assert isinstance(moved.get_output_embeddings(), HostHead)
    emb = moved.get_input_embeddings()
    assert isinstance(emb, HostEmbedding) and "model.embed_tokens.weight" not in dict(moved.named_parameters())
    assert torch.equal(emb.weight, ref.get_input_embeddings().weight)
    x = torch.randint(4, 90, (2, 12))
    assert rel_err(moved(input_ids=x).logits, ref(input_ids=x).logits) < 1e-6


def test_tied_embeddings_stay():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtune.hf.training import embeddings_to_host

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=True))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert embeddings_to_host(model) == [] and type(model.get_input_embeddings()) is torch.nn.Embedding


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_head_cross_entropy_matches_torch(monkeypatch, backend, dtype):
    """Loss and input gradient in one pass over the table's pieces (online log-sum-exp) against
    F.cross_entropy on the whole logits; ignored rows add nothing; forward gives the logits."""
    monkeypatch.setenv("QTUNE_BACKEND", backend)
    monkeypatch.setattr(HostHead, "PIECE", 16)  # 50 rows: 4 pieces, the last partial
    torch.manual_seed(2)
    w = (torch.randn(50, 24) * 0.3).to(dtype)
    head = HostHead(w)
    h = torch.randn(9, 24).to(dtype).requires_grad_()
    targets = torch.tensor([0, 15, 16, 49, -100, 31, 32, 7, -100])
    logits = torch.nn.functional.linear(h, w).float()
    want = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    (want_g,) = torch.autograd.grad(want, h)
    total, grad = head.cross_entropy_sum(h.detach(), targets, True)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(total, want) < tol and grad.dtype == torch.float32
    assert rel_err(grad, want_g.float()) < tol, rel_err(grad, want_g.float())
    assert torch.equal(grad[4], torch.zeros(24)) and torch.equal(grad[8], torch.zeros(24))
    assert rel_err(head(h.detach()), logits.to(dtype)) < tol


def test_loss_through_a_host_head_matches_the_chunked_loss(tiny_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from qtune.hf.training import embeddings_to_host
    from qtune.loss import causal_lm_loss

    monkeypatch.setattr(HostHead, "PIECE", 40)
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    moved = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    moved.config.tie_word_embeddings = False
    embeddings_to_host(moved)
    x = torch.randint(4, 90, (2, 12))
    labels = x.clone()
    labels[:, :3] = -100
    for static in (False, True):
        losses = [causal_lm_loss(m, {"input_ids": x, "labels": labels}, static=static) for m in (ref, moved)]
        grads = [torch.autograd.grad(loss, m.model.layers[0].mlp.up_proj.weight)[0] for loss, m in zip(losses, (ref, moved))]
        assert rel_err(losses[1], losses[0]) < 1e-6 and rel_err(grads[1], grads[0]) < 1e-5


@pytest.mark.gpu
def test_gather_from_pinned_host_memory_on_the_gpu():
    torch.manual_seed(0)
    weight = torch.randn(32000, 5120, dtype=torch.float16)
    emb = HostEmbedding(weight)
    assert emb.weight.is_pinned() and emb.weight.device.type == "cpu"
    ids = torch.randint(0, 32000, (2, 1024), device="cuda")
    got = emb(ids)
    assert got.is_cuda and torch.equal(got, F.embedding(ids, weight.cuda()))
    graph, static = torch.cuda.CUDAGraph(), ids.clone()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        emb(static)
        with torch.cuda.graph(graph):
            out = emb(static)
    static.copy_(torch.randint(0, 32000, (2, 1024), device="cuda"))
    graph.replay()
    assert torch.equal(out, F.embedding(static, weight.cuda()))  # captured reads of host memory replay
    head, h = HostHead(weight), torch.randn(300, 5120, device="cuda", dtype=torch.float16)  # the 13B shapes
    targets = torch.randint(0, 32000, (300,), device="cuda")
    logits = torch.nn.functional.linear(h, weight.cuda()).float()
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    total, grad = head.cross_entropy_sum(h, targets, True)
    want_g = (torch.softmax(logits, 1) - torch.nn.functional.one_hot(targets, 32000)) @ weight.cuda().float()
    assert rel_err(total, want) < 1e-5 and rel_err(grad, want_g) < 1e-2  # fp16 products of the softmax
