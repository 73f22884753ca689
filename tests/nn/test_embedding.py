"""Host-memory embedding: the gather kernel vs F.embedding, and the swap in a Llama model."""

import pytest
import torch
import torch.nn.functional as F

from qtune.kernels.embedding import gather_rows
from qtune.nn.embedding import HostEmbedding


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
    assert embeddings_to_host(moved)
    emb = moved.get_input_embeddings()
    assert isinstance(emb, HostEmbedding) and "model.embed_tokens.weight" not in dict(moved.named_parameters())
    assert torch.equal(emb.weight, ref.get_input_embeddings().weight)
    x = torch.randint(4, 90, (2, 12))
    assert torch.equal(moved(input_ids=x).logits, ref(input_ids=x).logits)


def test_tied_embeddings_stay():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtune.hf.training import embeddings_to_host

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=True))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not embeddings_to_host(model) and type(model.get_input_embeddings()) is torch.nn.Embedding


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
