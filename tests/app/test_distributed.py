"""Several processes on the CPU over gloo (torchrun) against one process with the same global batch
(grad_accum x 2): data parallel (ddp) and FSDP2-sharded 4-bit base weights (fsdp)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import one_line, rel_err
from safetensors.torch import load_file

ARGS = ["recipe=tiny", "data.max_examples=96", "train.seq_len=96", "train.micro_batch=4", "train.max_steps=4",
        "train.log_every=1", "train.eval_every=1000", "lora.dropout=0.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(root) -> dict:
    env = dict(os.environ, QTUNE_CACHE=str(root / "cache"), HF_DATASETS_CACHE=str(root / "ds"), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def train(root, out: str, *args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())] \
        if ranks > 1 else []
    return subprocess.run([sys.executable, *launch, "-m", "qtune.train", *ARGS, *args, f"hydra.run.dir={root / out}"],
                          env=run_env(root), cwd=root, capture_output=True, text=True, timeout=600)


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def flat_adapter(path) -> tuple[list[str], torch.Tensor]:
    sd = load_file(path / "adapter" / "adapter_model.safetensors")
    return sorted(sd), torch.cat([sd[k].flatten() for k in sorted(sd)])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, global batch 8 (micro-batch 4 x grad_accum 2), checkpoint at step 2."""
    root = tmp_path_factory.mktemp("dist")
    done = train(root, "one", "train.grad_accum=2", "train.save_every=2")
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def test_two_ranks_agree_with_a_single_process(single):
    tmp_path = single
    ddp = train(tmp_path, "two", "train.grad_accum=1", ranks=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    recs = records(tmp_path / "two")
    sums = [r["rank_param_sums"] for r in recs if "rank_param_sums" in r]
    assert len(sums) == 1 and len(sums[0]) == 2 and sums[0][0] == sums[0][1]  # both ranks hold the same weights
    keys_one, a = flat_adapter(tmp_path / "one")
    keys_two, b = flat_adapter(tmp_path / "two")
    assert keys_one == keys_two
    # same global batch of 8: equal up to the order of float32 sums in the all-reduce
    assert rel_err(b, a) < 1e-4
    losses_one = [r["loss"] for r in records(tmp_path / "one") if "loss" in r]
    losses_two = [r["loss"] for r in recs if "loss" in r]
    assert losses_one == pytest.approx(losses_two, rel=1e-5)


def test_fsdp_shards_base_weights_trains_like_one_process_and_resumes(single):
    root = single
    fsdp = train(root, "fsdp", "train.grad_accum=1", "train.save_every=2", "train.strategy=fsdp", ranks=2)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    recs, recs_one = records(root / "fsdp"), records(root / "one")
    # each rank holds half of every packed 4-bit weight (the tiny model's shard sizes divide evenly)
    mem = next(r for r in recs if "rank_base_weight_bytes" in r)["rank_base_weight_bytes"]
    whole = next(r for r in recs_one if "rank_base_weight_bytes" in r)["rank_base_weight_bytes"]
    assert len(mem) == 2 and mem[0] == mem[1] == whole[0] // 2
    losses = [r["loss"] for r in recs if "loss" in r]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    assert losses == pytest.approx([r["loss"] for r in recs_one if "loss" in r], rel=1e-4)
    # the adapter is gathered whole on rank 0: the same tensors as one process trained with the
    # same global batch, up to float32 reduction order (and the 8-bit optimizer states' rounding)
    keys_one, a = flat_adapter(root / "one")
    keys, b = flat_adapter(root / "fsdp")
    assert keys == keys_one and rel_err(b, a) < 1e-4

    # an fsdp checkpoint (whole adapter + each rank's optimizer shard) continues exactly
    ckpt = root / "fsdp" / "checkpoints" / "step_0000002"
    again = train(root, "fsdp_resumed", "train.grad_accum=1", "train.strategy=fsdp", f"train.resume={ckpt}", ranks=2)
    assert again.returncode == 0, again.stderr[-3000:]
    _, c = flat_adapter(root / "fsdp_resumed")
    assert rel_err(c, b) < 1e-6
    resumed = [r["loss"] for r in records(root / "fsdp_resumed") if "loss" in r]
    assert resumed == pytest.approx(losses[2:], rel=1e-6)

    # its optimizer states are sharded over 2 ranks: another world size or strategy is refused
    from qtune.distributed import Group

    saved = torch.load(ckpt / "state.pt", weights_only=False)
    assert len(saved["optimizer_shards"]) == 2
    with pytest.raises(ValueError) as e:
        Group("fsdp").optimizer_state(saved)
    assert one_line(e) == ("this checkpoint's optimizer states are sharded over 2 fsdp ranks; resume it with "
                           "train.strategy=fsdp on 2 ranks (now: 1 ddp rank)")

    # the consolidated adapter is a plain peft adapter: it loads on one process
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qtune.hf import QuantConfig

    base = AutoModelForCausalLM.from_pretrained(root / "cache" / "tiny-llama-v3", dtype=torch.float32,
                                                quantization_config=QuantConfig(compute_dtype=torch.float32))
    model = PeftModel.from_pretrained(base, root / "fsdp" / "adapter")
    saved = load_file(root / "fsdp" / "adapter" / "adapter_model.safetensors")
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    loaded = dict(model.named_parameters())[name.replace("lora_A.weight", "lora_A.default.weight")]
    assert torch.equal(loaded.detach(), saved[name])


def _shard_worker(rank: int, port: int, out: str) -> None:
    """One of 2 gloo ranks: fully_shard a module of Linear4bit layers with uneven packed sizes (uint8
    and float32 storage) and compare forward and input gradient with the unsharded layers."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {storage: _sharded_vs_whole(getattr(torch, storage)) for storage in ("uint8", "float32")}
    torch.save(results, f"{out}.{rank}")
    dist.barrier()  # no rank tears gloo down while the other still talks to it (an abort at exit, 1 run in 5)
    dist.destroy_process_group()


def _sharded_vs_whole(dtype: torch.dtype) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from qtune.nn import Linear4bit

    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[Linear4bit.from_linear(torch.nn.Linear(i, o), double_quant=True, quant_storage=dtype)
                                   for i, o in ((70, 33), (33, 9))])  # 1155 and 149 bytes packed
    x = torch.randn(3, 70, requires_grad=True)
    ref = layers(x)
    ref.sum().backward()
    ref_grad, x.grad = x.grad, None
    whole = [layer.weight.numel() for layer in layers]
    fully_shard(layers[0], mesh=init_device_mesh("cpu", (2,)))
    fully_shard(layers, mesh=init_device_mesh("cpu", (2,)))
    local = [layer.weight.to_local().numel() for layer in layers]
    assert all(isinstance(layer.weight, DTensor) for layer in layers)
    y = layers(x)
    y.sum().backward()
    return {"whole": whole, "local": local, "equal": torch.equal(y, ref), "grad": torch.equal(x.grad, ref_grad)}


def test_fsdp_all_gathers_packed_weights_exactly(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.spawn(_shard_worker, args=(free_port(), out), nprocs=2)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for storage in ("uint8", "float32"):
        r0, r1 = ranks[0][storage], ranks[1][storage]
        assert r0["equal"] and r0["grad"] and r1["equal"] and r1["grad"], storage
        for w, a, b in zip(r0["whole"], r0["local"], r1["local"]):
            assert a + b == w and a == -(-w // 2), storage  # dim-0 chunks, the last one shorter (FSDP pads it)


def test_strategy_errors():
    from qtune.distributed import Group
    from qtune.nn import Linear8bit

    with pytest.raises(ValueError) as e:
        Group("zero3")
    assert one_line(e) == "train.strategy='zero3' is not supported; allowed: ddp, fsdp"
    group = Group("ddp")
    group.world = 2  # as if launched with two ranks (the checks need no process group)
    offloading = torch.nn.Linear(2, 2)
    offloading.hf_device_map = {"model.layers.0": 0, "model.layers.1": "cpu"}
    with pytest.raises(ValueError) as e:
        group.check_model(offloading, torch.device("cuda", 0))
    assert "offloads modules to cpu" in one_line(e)
    group.fsdp = True
    with pytest.raises(ValueError) as e:
        group.check_model(torch.nn.Sequential(Linear8bit(4, 4)), torch.device("cpu"))
    assert "8-bit base weights" in one_line(e)


def test_ranks_build_the_generated_model_on_a_fresh_cache(tmp_path):
    """torchrun on a machine that has never built the tiny model: every rank builds (or finds) it
    before torch.distributed starts (afterwards transformers would save on rank 0 only)."""
    done = train(tmp_path, "fresh", "train.max_steps=1", ranks=2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.isfile(tmp_path / "cache" / "tiny-llama-v3" / "config.json")
