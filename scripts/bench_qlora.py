"""End-to-end QLoRA training step, three stacks on the same checkpoint, in one process on one GPU.

    python scripts/bench_qlora.py [--seq 1024 4096] [--steps 10] [--stacks A B C] [--json PATH]
    python scripts/bench_qlora.py --quality-steps 200      # loss curves of A and C, 200 steps at seq 1024
    python scripts/bench_qlora.py --cpu-smoke              # tiny model, stacks B and C on the CPU

Model: Llama-2-13B's shape (hidden 5120, intermediate 13824, 40 heads, vocab 32000) with `--layers`
(4) decoder layers, randomly initialised and saved once (scripts/make_random_model.py) under
$QTUNE_CACHE/bench (default ~/.cache/qtune/bench). Batch 1 of random tokens (labels = inputs), LoRA
r=16 (alpha 32, dropout 0.05) on all linear layers, gradient checkpointing, 8-bit AdamW at lr 2e-4,
gradients clipped at 1.0; every model in train mode.

- A, what users run today, as issue 9 defines it: transformers + BitsAndBytesConfig (NF4, double
  quant, bf16 compute) -> peft.prepare_model_for_kbit_training -> get_peft_model ->
  bitsandbytes.optim.AdamW8bit; `model(**batch).loss` (HF's full fp32 logits). No autocast, so the
  fp32 upcasts of prepare_model_for_kbit_training (norms, embeddings, lm_head) carry the hidden
  states and logits in fp32; `--a-autocast` runs it under bf16 torch.autocast instead (a faster A).
- B: bf16 LoRA without quantization (frozen bf16 base, same peft LoRA and 8-bit AdamW, HF loss).
- C: qtune's training step as qtune.train runs it: qtune.model.load_model on a RunConfig, the
  loop's make_optimizer / make_schedule / GradScaler / make_micro_steps (a CUDA graph per
  micro-step after two eager ones, as the loop does with packed batches; `--c-eager` turns it off).

A step is forward + backward + clip + optimizer.step + zero_grad; 3 warm-up steps, then `--steps`
timed between torch.cuda.synchronize calls. Peak memory is torch.cuda.max_memory_allocated over the
warm-up and timed steps (the counter is reset after loading); the model's own footprint after
loading is reported beside it. Models are freed between stacks. Prints a table with the ratios C/A
and C/B and the issue's acceptance checks; writes JSON (`--json`, default $OUT/bench_qlora.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_random_model import cached_random_model  # noqa: E402
from profile_train import kernel_class  # noqa: E402

ACCEPT = {"C/A tokens_per_s": (">=", 1.7), "C/B tokens_per_s": (">=", 0.95), "C/A peak_mem": ("<=", 0.8)}
QUALITY_TOL = 0.02
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)


def gib(n: int) -> float:
    return n / 2**30


def ensure_model(args) -> str:
    """The random checkpoint (shared with the other benchmarks), or --model-dir."""
    return cached_random_model("llama2-13b", args.layers, "float32" if args.cpu_smoke else "bfloat16",
                               "-tiny" if args.cpu_smoke else "", args.model_dir,
                               **(TINY if args.cpu_smoke else {}))


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_config(path: str, args, seq: int, device: torch.device):
    """The qtune run config of stack C: the schema's defaults with the benchmark's settings."""
    from omegaconf import OmegaConf

    from qtune.config import RunConfig

    cfg = OmegaConf.structured(RunConfig)
    cfg.model.name, cfg.model.dtype = path, args.dtype
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = args.r, 2 * args.r, args.lora_dropout
    cfg.lora.target_modules = ["all-linear"]
    cfg.optim.name, cfg.optim.lr, cfg.optim.max_grad_norm = "adamw8bit", args.lr, args.max_grad_norm
    cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.weight_decay = "constant", 0, 0.0
    cfg.train.seq_len, cfg.train.micro_batch, cfg.train.grad_accum = seq, 1, 1
    cfg.train.precision = "bf16" if device.type == "cuda" else "fp32"
    cfg.train.gradient_checkpointing, cfg.train.seed = True, args.seed
    cfg.data.packing = True  # every batch is seq tokens: one shape, as packed batches are
    cfg.train.cuda_graphs = not args.c_eager
    cfg.quant.decode_in_pieces = args.c_pieces
    return cfg


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.lora_dropout, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def autocast_dtype(args, device):
    return getattr(torch, args.dtype) if device.type == "cuda" else None


def hf_step(model, optimizer, args, device, autocast: bool = True):
    """A plain PyTorch training step over an HF/peft model (stacks A and B); `autocast`: under
    torch.autocast in the compute dtype."""
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = autocast_dtype(args, device) if autocast else None

    def step(batch) -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def stack_a(path, args, seq, device):
    import bitsandbytes as bnb
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, args.dtype)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype, device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, lora_config(args))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return model, hf_step(model, opt, args, device, autocast=args.a_autocast), {
        "optimizer": "bitsandbytes.optim.AdamW8bit", "bitsandbytes": bnb.__version__, "autocast": args.a_autocast}


def stack_b(path, args, seq, device):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from qtune.hf import prepare_for_training

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype), device_map={"": device})
    model = get_peft_model(prepare_for_training(model, gradient_checkpointing=True), lora_config(args))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    try:
        import bitsandbytes as bnb

        opt, name = bnb.optim.AdamW8bit(params, **kw), "bitsandbytes.optim.AdamW8bit"
    except ImportError:  # the CPU smoke test: no bitsandbytes here
        opt, name = torch.optim.AdamW(params, **kw), "torch.optim.AdamW"
    return model, hf_step(model, opt, args, device), {"optimizer": name}


def stack_c(path, args, seq, device):
    from qtune import loop
    from qtune.distributed import Group
    from qtune.model import autocast_dtype_for, load_model

    cfg = run_config(path, args, seq, device)
    t = cfg.train
    group = Group(t.strategy)  # world 1: no torch.distributed
    torch.manual_seed(t.seed)
    model, _ = load_model(cfg, device)
    torch.manual_seed(t.seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = loop.make_optimizer(cfg, params)
    scheduler = loop.make_schedule(cfg, optimizer, 10**6)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16" and device.type == "cuda")
    if args.c_unfuse:  # transformers' forwards instead of the fused ones load_model sets, for comparison
        from qtune.hf.training import MLP_CLASSES, ROPE_ATTENTION_CLASSES

        classes = {"rope": ROPE_ATTENTION_CLASSES, "swiglu": MLP_CLASSES}
        for m in model.modules():
            if any(type(m).__name__ in classes[k] for k in args.c_unfuse) and "forward" in vars(m):
                del m.forward
    micro_steps = loop.make_micro_steps(cfg, model, scaler, device, group, autocast_dtype_for(t.precision, device))
    model.train()

    def step(batch) -> float:  # the body of qtune.loop.train's step, one process, grad_accum 1
        # an all-ones attention mask says nothing; transformers cannot check that while a graph is
        # being captured, and would build a full mask (no causal fast path) for it
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        loss_val = float(micro_steps(batch))
        group.average_grads(params)
        loop.apply_update(group, params, optimizer, scaler, scheduler, cfg.optim.max_grad_norm, math.isfinite(loss_val),
                          micro_steps.set_to_none)
        return loss_val

    graphs = "CUDA graph per micro-step" if micro_steps.graphs else "eager"
    return model, step, {"optimizer": f"qtune {type(optimizer).__name__} (loop.make_optimizer)",
                         "loss": "qtune.loss.causal_lm_loss", "step": graphs}


STACKS = {"A": stack_a, "B": stack_b, "C": stack_c}


def random_batches(n: int, seq: int, vocab: int, seed: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (1, seq), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": ids.clone().to(device)})
    return out


def attention_backends(stack: str, args) -> None:
    """A and B with torch's default attention backends; C as qtune.train sets them (cuDNN's off but for
    batches without a mask, as C's are: qtune.microstep.attention_for)."""
    torch.backends.cuda.enable_cudnn_sdp(stack != "C")


def train(stack: str, path: str, args, seq: int, device, batches: list[dict], warmup: int, steps: int) -> dict:
    """Load a stack, run warm-up and timed steps (cycling through `batches`), free it."""
    cuda = device.type == "cuda"
    free()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        attention_backends(stack, args)
    t0 = time.perf_counter()
    model, step, info = STACKS[stack](path, args, seq, device)
    rec = {"stack": stack, "seq": seq, "load_s": time.perf_counter() - t0, **info}
    if cuda:
        rec["model_mem_gib"] = gib(torch.cuda.memory_allocated(device))
        rec["load_peak_mem_gib"] = gib(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    losses = [step(batches[i % len(batches)]) for i in range(warmup)]
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    losses += [step(batches[(warmup + i) % len(batches)]) for i in range(steps)]
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    rec.update(tokens_per_s=steps * seq / dt, step_ms=1e3 * dt / steps, losses=losses,
               peak_mem_gib=gib(torch.cuda.max_memory_allocated(device)) if cuda else None)
    del model, step
    free()
    return rec


def safe_train(*a, **kw) -> dict:
    try:
        return train(*a, **kw)
    except torch.cuda.OutOfMemoryError as e:
        free()
        return {"stack": a[0], "seq": a[3], "error": f"CUDA out of memory: {str(e).splitlines()[0]}"}


def ratios(results: list[dict], seq: int) -> dict:
    by = {r["stack"]: r for r in results if r["seq"] == seq and "error" not in r}
    out = {}
    for ref in ("A", "B"):
        if "C" in by and ref in by:
            out[f"C/{ref} tokens_per_s"] = by["C"]["tokens_per_s"] / by[ref]["tokens_per_s"]
            if by["C"]["peak_mem_gib"] is not None:
                out[f"C/{ref} peak_mem"] = by["C"]["peak_mem_gib"] / by[ref]["peak_mem_gib"]
    return out


def check(name: str, value: float) -> str:
    if name not in ACCEPT:
        return ""
    op, bound = ACCEPT[name]
    ok = value >= bound if op == ">=" else value <= bound
    return f"{'PASS' if ok else 'FAIL'} ({op} {bound})"


def speed(path, args, device, vocab) -> tuple[list[dict], dict]:
    results, table = [], {}
    for seq in args.seq:
        batches = random_batches(1, seq, vocab, args.seed, device)
        for stack in args.stacks:
            rec = safe_train(stack, path, args, seq, device, batches, args.warmup, args.steps)
            results.append(rec)
            if "error" in rec:
                print(f"seq {seq:5d}  {stack}: {rec['error']}", flush=True)
                continue
            mem = f"{rec['peak_mem_gib']:7.2f} GiB (model {rec['model_mem_gib']:.2f})" if rec["peak_mem_gib"] else "      -"
            print(f"seq {seq:5d}  {stack}: {rec['tokens_per_s']:9.0f} tok/s  {rec['step_ms']:8.1f} ms/step  "
                  f"peak {mem}  loss {rec['losses'][-1]:.4f}", flush=True)
        table[seq] = ratios(results, seq)
    print("\nratios (stack C over A and B)")
    for seq, rs in table.items():
        for name, value in rs.items():
            print(f"  seq {seq:5d}  {name:18s} {value:6.3f}  {check(name, value) if device.type == 'cuda' else ''}")
    return results, {str(k): v for k, v in table.items()}


def quality(path, args, device, vocab) -> dict:
    """Train the reference stack and C for `--quality-steps` on the same data and seed; compare the
    means of the last 20 losses. Data: a fixed pool of 16 random sequences, cycled (learnable)."""
    seq = args.quality_seq
    batches = random_batches(16, seq, vocab, args.seed + 1, device)
    curves = {}
    for stack in (args.quality_ref, "C"):
        rec = safe_train(stack, path, args, seq, device, batches, 0, args.quality_steps)
        if "error" in rec:
            print(f"quality {stack}: {rec['error']}")
            return {"error": rec["error"], "stack": stack}
        curves[stack] = rec["losses"]
    tail = min(20, args.quality_steps)
    means = {k: sum(v[-tail:]) / tail for k, v in curves.items()}
    ref = args.quality_ref
    rel = abs(means["C"] - means[ref]) / abs(means[ref])
    print(f"\nquality over {args.quality_steps} steps at seq {seq} (lr {args.lr}): mean of the last {tail} losses "
          f"{ref} {means[ref]:.4f}, C {means['C']:.4f}; first {ref} {curves[ref][0]:.4f}, C {curves['C'][0]:.4f}; "
          f"relative difference {rel:.4f}  {'PASS' if rel <= QUALITY_TOL else 'FAIL'} (<= {QUALITY_TOL})")
    return {"steps": args.quality_steps, "seq": seq, "lr": args.lr, "reference": ref, "tail": tail,
            "final_mean": means, "relative_difference": rel, "pass": rel <= QUALITY_TOL, "curves": curves}


def profile(path, args, device, vocab) -> dict:
    """Where a step's time goes, per stack: torch.profiler over 3 steps after warm-up; GPU busy time
    against wall time (host-bound when far below) and the top kernels and CPU ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = {}
    for seq in args.seq:
        batches = random_batches(1, seq, vocab, args.seed, device)
        for stack in args.stacks:
            free()
            attention_backends(stack, args)
            model, step, _ = STACKS[stack](path, args, seq, device)
            for _ in range(args.warmup):
                step(batches[0])
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step(batches[0])
                torch.cuda.synchronize(device)
            wall = (time.perf_counter() - t0) / 3 * 1e3
            ev = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
            gpu = sum(e.self_device_time_total for e in ev) / 3 / 1e3
            top = sorted(ev, key=lambda e: e.self_device_time_total, reverse=True)[:25]
            classes: dict[str, float] = {}
            for e in ev:
                if e.self_device_time_total > 0:
                    c = kernel_class(e.key)
                    classes[c] = classes.get(c, 0.0) + e.self_device_time_total / 3 / 1e3
            print(f"\nprofile seq {seq} stack {stack}: wall {wall:.1f} ms/step, GPU busy {gpu:.1f} ms/step")
            print("  by kernel class (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                          sorted(classes.items(), key=lambda kv: -kv[1])))
            for e in top:
                print(f"  {e.self_device_time_total / 3 / 1e3:8.2f} ms  {e.count // 3:5d}x  {e.key[:90]}")
            cpu = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
            print("  CPU self time: " + ", ".join(f"{e.key[:40]} {e.self_cpu_time_total / 3 / 1e3:.1f} ms" for e in cpu))
            out[f"{seq}-{stack}"] = {"wall_ms": wall, "gpu_ms": gpu, "classes": classes, "top": [
                (e.key, e.count // 3, e.self_device_time_total / 3 / 1e3) for e in top]}
            del model, step
    return out


def environment(device) -> dict:
    import peft
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "python": platform.python_version(), "device": str(device)}
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        env["qtune_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        pass
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--stacks", nargs="+", choices=sorted(STACKS), default=["A", "B", "C"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--model-dir", default=None, help="the random checkpoint (default: under $QTUNE_CACHE/bench)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--a-autocast", action="store_true",
                    help="stack A under bf16 torch.autocast (default: without, as issue 9 describes stack A: the "
                         "4-bit layers compute in bf16, the rest, fp32 after prepare_model_for_kbit_training, in fp32)")
    ap.add_argument("--c-eager", action="store_true", help="stack C without CUDA graphs (train.cuda_graphs=false)")
    ap.add_argument("--c-pieces", action="store_true",
                    help="stack C with quant.decode_in_pieces=true (large weights decoded in 32 MiB row pieces)")
    ap.add_argument("--c-unfuse", nargs="+", default=[], choices=["rope", "swiglu"],
                    help="stack C with transformers' rotary embedding / MLP activation, not qtune's kernels")
    ap.add_argument("--quality-steps", type=int, default=0,
                    help="instead of the speed runs: train A and C this many steps (200) and compare losses")
    ap.add_argument("--quality-seq", type=int, default=1024)
    ap.add_argument("--quality-ref", choices=["A", "B"], default="A")
    ap.add_argument("--profile", action="store_true", help="instead of the speed runs: profile 3 steps per stack")
    ap.add_argument("--json", default=None,
                    help="default: $OUT/bench_qlora.json ($OUT/bench_qlora_quality.json with --quality-steps)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny model (hidden 64, 2 layers), stacks B and C on the CPU, 2 steps, then 4 quality steps")
    args = ap.parse_args()
    if args.cpu_smoke:
        args.seq, args.steps, args.warmup, args.stacks, args.layers = [64], 2, 1, ["B", "C"], 2
        args.dtype, args.quality_ref, args.quality_seq = "float32", "B", 64
        args.quality_steps = args.quality_steps or 4
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA GPU (or --cpu-smoke)")
    else:
        device = torch.device("cuda", torch.cuda.current_device())

    if args.json is None and os.environ.get("OUT"):
        name = ("bench_qlora_profile.json" if args.profile else "bench_qlora_quality.json"
                if args.quality_steps and not args.cpu_smoke else "bench_qlora.json")
        args.json = os.path.join(os.environ["OUT"], name)
    path = ensure_model(args)
    with open(os.path.join(path, "config.json")) as f:
        mcfg = json.load(f)
    vocab = mcfg["vocab_size"]
    report = {"env": environment(device), "model": {"path": path, **{k: mcfg[k] for k in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")}},
        "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    print(f"{report['env'].get('gpu', 'cpu')}: torch {torch.__version__}; model {path}", flush=True)
    if args.profile:
        report["profile"] = profile(path, args, device, vocab)
    elif args.quality_steps and not args.cpu_smoke:
        report["quality"] = quality(path, args, device, vocab)
    else:
        report["results"], report["ratios"] = speed(path, args, device, vocab)
        if args.cpu_smoke:
            report["quality"] = quality(path, args, device, vocab)
        report["acceptance"] = {} if args.cpu_smoke else {seq: {name: check(name, v) for name, v in rs.items() if name in ACCEPT}
                                for seq, rs in report["ratios"].items()}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
