"""`python -m qtune.train`: the tiny recipe as the README runs it, exact resume, sweeps, wandb,
bad input. Subprocesses, as a user runs them."""

import glob
import json
import os
import subprocess
import sys

import pytest

QUICK = ["data.max_examples=96", "train.micro_batch=4", "train.seq_len=96", "train.eval_every=1000"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, QTUNE_CACHE=str(tmp_path_factory.mktemp("cache")), WANDB_MODE="offline",
             HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("hfds")), PYTHONUNBUFFERED="1")
    e.pop("TRITON_INTERPRET", None)  # the run picks its own backends
    return e


def run(args, cwd, env, check=True):
    p = subprocess.run([sys.executable, "-m", "qtune.train", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_tiny_recipe_as_the_readme_runs_it(tmp_path, env):
    run(["recipe=tiny"], tmp_path, env)
    (run_dir,) = glob.glob(str(tmp_path / "outputs" / "*" / "*"))
    recs = metrics(run_dir)
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] <= 0.7 * losses[0], losses  # falls by at least 30% from the first logged value
    assert [r for r in recs if "eval_loss" in r]
    adapter = os.path.join(run_dir, "adapter")
    for name in ("adapter_model.safetensors", "adapter_config.json", "qtune_config.yaml"):
        assert os.path.isfile(os.path.join(adapter, name)), name
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_0000100", "step_0000200"]


def test_gradient_checkpointing_is_really_on(tmp_path, env, monkeypatch):
    """Each decoder layer runs twice per training step: forward, then again in backward."""
    from omegaconf import OmegaConf

    from qtune.config import RunConfig
    from qtune.model import load_model

    monkeypatch.setenv("QTUNE_CACHE", env["QTUNE_CACHE"])
    import torch

    cfg = OmegaConf.structured(RunConfig)
    cfg.model.name, cfg.model.build, cfg.model.dtype = str(tmp_path / "m"), "tiny-llama", "float32"
    cfg.train.gradient_checkpointing = True
    cfg.quant.decode_in_pieces = True  # (off by default) set on every 4-bit layer
    model, _ = load_model(cfg, torch.device("cpu"))
    from qtune.nn import Linear4bit

    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 7 * 4 and all(m.decode_in_pieces for m in quantized) and not Linear4bit.decode_in_pieces
    layer = model.base_model.model.model.layers[0]
    calls = []
    forward = layer.mlp.forward
    layer.mlp.forward = lambda x: calls.append(1) or forward(x)  # (module hooks do not see the recompute)
    model.train()
    x = torch.randint(4, 90, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    assert len(calls) == 2
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    assert len(calls) == 1


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path, env):
    args = ["recipe=tiny", *QUICK, "train.max_steps=8", "train.save_every=4", "train.log_every=1", "lora.dropout=0.1"]
    run([*args, f"hydra.run.dir={tmp_path / 'a'}"], tmp_path, env)
    p = run([*args, f"hydra.run.dir={tmp_path / 'b'}", "train.simulate_sigterm_at=6"], tmp_path, env, check=False)
    assert p.returncode == 128 + 15, p.stderr[-2000:]
    assert "interrupted at step 6" in p.stdout
    assert os.path.isdir(tmp_path / "b" / "checkpoints" / "step_0000006")
    assert not os.path.exists(tmp_path / "b" / "adapter")
    run([*args, f"hydra.run.dir={tmp_path / 'b'}", "train.resume=auto"], tmp_path, env)
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [r["step"] for r in a]
    timing = {"tokens_per_s", "gpu_mem_gib"}
    for ra, rb in zip(a, b):  # every loss, lr, grad norm and eval loss, bit for bit
        assert {k: v for k, v in ra.items() if k not in timing} == {k: v for k, v in rb.items() if k not in timing}


def test_multirun_gives_one_directory_per_point(tmp_path, env):
    run(["-m", "recipe=tiny", *QUICK, "train.max_steps=2", "lora.r=4,8", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        tmp_path, env)
    for job in ("0", "1"):
        assert os.path.isfile(tmp_path / "sweep" / job / "adapter" / "adapter_model.safetensors")
    ranks = [json.load(open(tmp_path / "sweep" / j / "adapter" / "adapter_config.json"))["r"] for j in "01"]
    assert ranks == [4, 8]


def test_wandb_offline_run(tmp_path, env):
    pytest.importorskip("wandb")
    run(["recipe=tiny", *QUICK, "train.max_steps=2", "logger=wandb", f"hydra.run.dir={tmp_path / 'w'}"], tmp_path, env)
    assert glob.glob(str(tmp_path / "w" / "wandb" / "offline-run-*"))


@pytest.mark.parametrize("args,match", [
    (["recipe=nope"], "unknown recipe 'nope'; available: "),
    (["recipe=tiny", "train.resume=/does/not/exist"], "holds no checkpoint"),
    (["recipe=tiny", "data.path=/does/not/exist.jsonl"], "does not exist"),
    (["recipe=tiny", "train.seq_len=8"], "prompts of train.seq_len=8"),
    (["recipe=tiny", "optim.name=sgd"], "optim.name 'sgd' is not supported"),
    (["recipe=tiny", "optim.name=adamw", "optim.paged=true"], "optim.paged=true needs an 8-bit optimizer"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, env, args, match):
    p = run([*args, f"hydra.run.dir={tmp_path / 'x'}"], tmp_path, env, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and match in errors[0], p.stderr[-2000:]
    assert not os.path.exists(tmp_path / "x" / "adapter")


def test_misspelt_key_fails_at_start(tmp_path, env):
    p = run(["recipe=tiny", "train.max_stepz=3"], tmp_path, env, check=False)
    assert p.returncode != 0 and "max_stepz" in p.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_graph_steps_train_as_eager_ones(tmp_path, env, precision):
    """With packed batches each micro-step is replayed from a CUDA graph (after two eager ones):
    the same losses as eager steps (hashed LoRA dropout, gradient accumulation, fp16 loss scaling)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    args = ["recipe=tiny", *QUICK, "train.max_steps=8", "train.log_every=1", "train.grad_accum=2", "lora.dropout=0.1",
            "data.packing=true", f"train.precision={precision}", "train.device=cuda",
            "optim.paged=true", "model.host_embeddings=true"]  # both read host memory from the graph
    g = run([*args, f"hydra.run.dir={tmp_path / 'g'}"], tmp_path, env)
    run([*args, f"hydra.run.dir={tmp_path / 'e'}", "train.cuda_graphs=false"], tmp_path, env)
    assert "cuda graphs off" not in g.stdout + g.stderr
    a = [r["loss"] for r in metrics(tmp_path / "e") if "loss" in r]
    b = [r["loss"] for r in metrics(tmp_path / "g") if "loss" in r]
    print("eager", a, "\ngraphs", b)
    assert len(a) == len(b) == 8 and max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 2e-3, (a, b)
    assert b[-1] < b[0]
    # checkpoint, eval and resume with graphs on: the resumed run repeats the uninterrupted one's losses
    more = ["train.save_every=4", "train.eval_every=4"]
    run([*args, *more, f"hydra.run.dir={tmp_path / 'u'}"], tmp_path, env)
    p = run([*args, *more, f"hydra.run.dir={tmp_path / 'r'}", "train.simulate_sigterm_at=4"], tmp_path, env, check=False)
    assert p.returncode == 128 + 15, p.stderr[-2000:]
    run([*args, *more, f"hydra.run.dir={tmp_path / 'r'}", "train.resume=auto"], tmp_path, env)
    u = [r for r in metrics(tmp_path / "u") if "loss" in r or "eval_loss" in r]
    r = [r for r in metrics(tmp_path / "r") if "loss" in r or "eval_loss" in r]
    key = lambda rec: rec.get("loss", rec.get("eval_loss"))  # noqa: E731
    assert [x["step"] for x in u] == [x["step"] for x in r] and any("eval_loss" in x for x in u)
    assert max(abs(key(x) - key(y)) / abs(key(x)) for x, y in zip(u, r)) < 1e-5, (u, r)


def test_micro_steps_say_why_graphs_are_off(capsys):
    """make_micro_steps: graphs only on a GPU with packed batches, no fsdp, no random draws in the
    model; the reason printed in one line; hashed-dropout seeds start at the run's micro-batch index."""
    import torch
    from omegaconf import OmegaConf

    from qtune.config import RunConfig
    from qtune.loop import make_micro_steps

    class G:  # a one-process Group
        world, rank, fsdp, main = 2, 1, False, True

    cfg = OmegaConf.structured(RunConfig)
    model = torch.nn.Linear(2, 2)
    model.qtune_dropout_seed, model.qtune_rng_free = torch.zeros(1, dtype=torch.int64), True
    steps = make_micro_steps(cfg, model, None, torch.device("cpu"), G(), None, position=5)
    assert not steps.graphs and steps.set_to_none and capsys.readouterr().out == ""  # CPU: nothing to say
    assert int(model.qtune_dropout_seed) == 5 * 2 + 1 - 2  # + world before each micro-batch: 11, 13, ...
    cuda = torch.device("cuda", 0)
    cases = [("data.packing=false (batch shapes vary)", {}), ("train.strategy=fsdp", {"packing": True, "fsdp": True}),
             ("the model's own dropout draws random numbers", {"packing": True, "rng_free": False}),
             ("train.cuda_graphs=false", {"packing": True, "graphs": False})]
    for why, kw in cases:
        cfg.data.packing, cfg.train.cuda_graphs = kw.get("packing", False), kw.get("graphs", True)
        G.fsdp, model.qtune_rng_free = kw.get("fsdp", False), kw.get("rng_free", True)
        if kw.get("graphs", True):
            make_micro_steps(cfg, model, None, cuda, G(), None)
            assert capsys.readouterr().out.strip() == f"cuda graphs off: {why}"
