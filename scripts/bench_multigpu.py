"""Data-parallel (ddp) and sharded (fsdp) QLoRA training against one GPU, through the real CLI.

    python scripts/bench_multigpu.py [--gpus 2] [--steps 20] [--seq 1024] [--layers 4] [--work DIR]

Model: Llama-2-13B's shape with `--layers` (4) decoder layers, random bf16 weights
(scripts/make_random_model.py), built once under $QTUNE_CACHE/bench; results and logs go to the work
directory ($OUT, else /tmp/bench_multigpu).
Each run is `python -m qtune.train recipe=llama2_7b` with that model: NF4 + double quant, bf16
compute, LoRA r=16 on all linear layers, 8-bit AdamW, gradient checkpointing, packed sequences of
`--seq` tokens, micro-batch 1 per GPU, grad_accum 1, `--steps` steps; first on one GPU, then
`torchrun --nproc_per_node GPUS` with train.strategy=ddp and with train.strategy=fsdp (same micro-batch
per GPU, so the global batch grows with the GPUs). NCCL settings are left at their defaults.

Throughput is the steady state between the step-5 record and the last one of metrics.jsonl (every
step carries the same number of tokens, so the cumulative tokens/s records give the time between
them); tokens/s per GPU = all ranks' tokens / time / GPUs; scaling = N-GPU tokens/s over 1-GPU's.
Memory per rank comes from the run's final record: packed 4-bit weights held, all parameters + quant
states held (by tensor sizes), memory allocated once the model is ready (sharded, before optimizer
states) and torch.cuda.max_memory_allocated over the whole run. Every rank loads the whole quantized
model before fsdp shards it, so the peak includes that load. Prints a table; writes bench_multigpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from make_random_model import cached_random_model  # noqa: E402
LOG_EVERY = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_data(work: str, copies: int = 6) -> str:
    """The shipped alpaca-format instruction set, repeated: enough packed sequences for the runs."""
    path = os.path.join(work, "instructions.jsonl")
    if not os.path.isfile(path):
        lines = open(os.path.join(ROOT, "qtune", "assets", "tiny_instructions.jsonl")).read().splitlines()
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(lines * copies) + "\n")
        os.replace(path + ".tmp", path)
    return path


def steady_tokens_per_s(recs: list[dict]) -> tuple[float, float]:
    """(steady-state tokens/s from the step-LOG_EVERY record to the last, whole-run tokens/s)."""
    logged = [r for r in recs if "tokens_per_s" in r]
    a, b = logged[0], logged[-1]
    if b["step"] == a["step"]:
        return b["tokens_per_s"], b["tokens_per_s"]
    # tokens_seen = step * k for a constant k, so elapsed = step * k / tokens_per_s
    return (b["step"] - a["step"]) / (b["step"] / b["tokens_per_s"] - a["step"] / a["tokens_per_s"]), \
        b["tokens_per_s"]


def run(name: str, gpus: int, strategy: str, model: str, data: str, a, work: str) -> dict:
    out = os.path.join(work, "runs", name)
    args = ["recipe=llama2_7b", f"model.name={model}", "model.dtype=bfloat16", f"data.path={data}",
            "data.eval_fraction=0.01", f"train.seq_len={a.seq}", "train.micro_batch=1", "train.grad_accum=1",
            f"train.max_steps={a.steps}", f"train.log_every={LOG_EVERY}", "train.eval_every=100000",
            "train.save_every=100000", "optim.schedule=constant", "optim.warmup_steps=0",
            f"train.strategy={strategy}", f"hydra.run.dir={out}"]
    launch = [sys.executable]
    if gpus > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_port", str(free_port())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=os.path.join(work, "datasets"))
    if gpus == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    t0 = time.time()
    print(f"== {name}: {gpus} GPU(s), strategy={strategy}", flush=True)
    done = subprocess.run([*launch, "-m", "qtune.train", *args], env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if done.returncode != 0:  # the whole output to a log beside the results; the tail here; go on
        log = os.path.join(work, f"{name}.log")
        with open(log, "w") as f:
            f.write(done.stdout + "\n" + done.stderr)
        errors = [line for line in done.stderr.splitlines() if "Error" in line or "error:" in line]
        print(f"   FAILED (exit {done.returncode}); full output in {log}; errors: {errors[-3:]}", flush=True)
        return {"name": name, "gpus": gpus, "strategy": strategy, "error": errors[-3:], "log": log}
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steady, whole = steady_tokens_per_s(recs)
    mem = next(r for r in reversed(recs) if "rank_model_bytes" in r)
    res = {"name": name, "gpus": gpus, "strategy": strategy, "tokens_per_s": steady,
           "tokens_per_s_per_gpu": steady / gpus, "tokens_per_s_whole_run": whole, "wall_s": wall,
           "last_loss": [r["loss"] for r in recs if "loss" in r][-1],
           "base_weight_gib_per_rank": [b / 2**30 for b in mem["rank_base_weight_bytes"]],
           "model_gib_per_rank": [b / 2**30 for b in mem["rank_model_bytes"]],
           "setup_gib_per_rank": mem.get("rank_setup_gpu_mem_gib"),
           "peak_gib_per_rank": mem.get("rank_peak_gpu_mem_gib")}
    print(f"   {res['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, peak {res['peak_gib_per_rank']} GiB, "
          f"{wall:.0f} s", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--work", default=os.environ.get("OUT") or "/tmp/bench_multigpu")
    ap.add_argument("--only", nargs="*", choices=["one", "ddp", "fsdp"], default=["one", "ddp", "fsdp"])
    ap.add_argument("--model", help="an existing model directory instead of the random 13B-shaped one "
                                    "(e.g. the tiny model, for a CPU smoke run)")
    a = ap.parse_args()
    import torch

    os.makedirs(a.work, exist_ok=True)
    t0 = time.time()
    # the random model lives in $QTUNE_CACHE/bench, not the work directory: that may be $OUT, which
    # should carry back results, not 3 GB of weights
    model, data = a.model or cached_random_model("llama2-13b", a.layers, "bfloat16"), ensure_data(a.work)
    print(f"model + data ready in {time.time() - t0:.0f} s", flush=True)
    results, failed = [], []
    if "one" in a.only:
        results.append(run("one_gpu", 1, "ddp", model, data, a, a.work))
    for strategy in ("ddp", "fsdp"):
        if strategy in a.only:
            results.append(run(f"{strategy}_{a.gpus}gpu", a.gpus, strategy, model, data, a, a.work))
    failed = [r for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    one = next((r for r in results if r["gpus"] == 1), None)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\n{device} x {a.gpus}, torch {torch.__version__}; Llama-2-13B shape, "
          f"{a.layers} layers, seq {a.seq}, micro-batch 1 per GPU, {a.steps} steps "
          f"(steady state from step {LOG_EVERY})")
    print(f"{'run':<12} {'tok/s/GPU':>10} {'speedup':>8} {'eff.':>6} {'4-bit GiB/rank':>15} {'model GiB/rank':>15} "
          f"{'ready GiB/rank':>18} {'peak GiB/rank':>18}")
    for r in results:
        speed = r["tokens_per_s"] / one["tokens_per_s"] if one else float("nan")
        r["speedup_vs_one_gpu"], r["scaling_efficiency"] = speed, speed / r["gpus"]
        peak = "/".join(f"{x:.2f}" for x in r["peak_gib_per_rank"] or [])
        ready = "/".join(f"{x:.2f}" for x in r["setup_gib_per_rank"] or [])
        print(f"{r['name']:<12} {r['tokens_per_s_per_gpu']:>10.0f} {speed:>7.2f}x {speed / r['gpus']:>6.1%} "
              f"{max(r['base_weight_gib_per_rank']):>15.3f} {max(r['model_gib_per_rank']):>15.3f} "
              f"{ready:>18} {peak:>18}")
    if one:
        for r in results:
            if r["strategy"] == "ddp" and r["gpus"] > 1:
                print(f"ddp speedup {r['speedup_vs_one_gpu']:.2f}x on {r['gpus']} GPUs (goal >= 1.85x): "
                      f"{'ok' if r['speedup_vs_one_gpu'] >= 1.85 else 'MISSED'}")
            if r["strategy"] == "fsdp" and r["gpus"] > 1:
                ratio = max(r["model_gib_per_rank"]) / one["model_gib_per_rank"][0]
                print(f"fsdp model memory per rank / one GPU's = {ratio:.2f} (goal about {1 / r['gpus']:.2f}; "
                      f"the replicated quant states keep it a little above)")
    path = os.path.join(a.work, "bench_multigpu.json")
    with open(path, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "args": vars(a),
                   "results": results, "failed": failed}, f, indent=1)
    print(f"wrote {path}; total {time.time() - t0:.0f} s")
    if failed:
        raise SystemExit(f"failed: {', '.join(r['name'] for r in failed)}")


if __name__ == "__main__":
    main()
