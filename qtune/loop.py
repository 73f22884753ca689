"""The training loop: accumulation, mixed precision, schedule, clipping, eval, checkpoints,
exact resume, signals. Ordinary PyTorch; no HF Trainer."""

from __future__ import annotations

import math
import os
import signal
import time

import torch

from . import run_state
from .data import build_datasets, collate, pack
from .distributed import Group
from .loss import causal_lm_loss
from .metrics import MetricsLogger
from .microstep import MicroSteps
from .model import PRECISIONS, autocast, autocast_dtype_for, ensure_built, load_model

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw8bit", "adam8bit", "adamw")


class RunError(ValueError):
    """A bad setting found at start: one line, exit code 2."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"train.device={name} but CUDA is not available")
    device = torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None else device


def make_optimizer(cfg, params):
    from .optim import Adam8bit, AdamW8bit

    o = cfg.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw8bit":
        return AdamW8bit(params, **kw, paged=o.paged)
    if o.name == "adam8bit":
        return Adam8bit(params, **kw, paged=o.paged)
    if o.name == "adamw":
        if o.paged:
            raise RunError("optim.paged=true needs an 8-bit optimizer; allowed with it: adamw8bit, adam8bit")
        return torch.optim.AdamW(params, **kw)
    raise RunError(f"optim.name {o.name!r} is not supported; allowed: {', '.join(OPTIMIZERS)}")


def make_schedule(cfg, optimizer, total: int):
    o = cfg.optim
    if o.schedule not in SCHEDULES:
        raise RunError(f"optim.schedule {o.schedule!r} is not supported; allowed: {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        frac = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        if o.schedule == "linear":
            return max(0.0, 1.0 - frac)
        if o.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Batches:
    """Deterministic micro-batches: epoch e visits the items in a permutation seeded by seed + e;
    the position is one integer (micro-batches consumed), so a resumed run sees the same data."""

    def __init__(self, items: list, micro_batch: int, seed: int, pad_id: int, mask_dtype, length: int | None = None,
                 device: torch.device | None = None) -> None:
        if len(items) < micro_batch:
            raise RunError(f"train.micro_batch={micro_batch} exceeds the {len(items)} training items")
        self.items, self.mb, self.seed, self.pad_id, self.mask_dtype = items, micro_batch, seed, pad_id, mask_dtype
        self.length, self.device = length, device
        self.per_epoch = len(items) // micro_batch
        self._perm_epoch, self._perm = -1, None

    def get(self, position: int) -> tuple[dict, int]:
        """(the micro-batch, its number of real tokens: padding excluded)."""
        epoch, i = divmod(position, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.items), generator=g).tolist(), epoch
        items = [self.items[j] for j in self._perm[i * self.mb:(i + 1) * self.mb]]
        n_tokens = sum(len(it["input_ids"] if isinstance(it, dict) else it.input_ids) for it in items)
        return collate(items, self.pad_id, self.mask_dtype, self.length, self.device), n_tokens


def _to(batch: dict, device) -> dict:
    """The batch on `device`; to a GPU through pinned memory without blocking (a copy from pageable
    memory would make the host wait for the GPU's queue to drain)."""
    cuda = device.type == "cuda"
    return {k: (v.pin_memory() if cuda and v.device.type == "cpu" else v).to(device, non_blocking=cuda)
            for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, items: list, micro_batch: int, pad_id: int, device, autocast_dtype, mask_dtype) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(items), micro_batch):
        batch = _to(collate(items[i:i + micro_batch], pad_id, mask_dtype, device=device), device)
        n = int((batch["labels"][:, 1:] != -100).sum())
        with autocast(device, autocast_dtype):
            loss = causal_lm_loss(model, batch)
        total, tokens = total + float(loss) * n, tokens + n
    model.train()
    return total / max(tokens, 1)


def apply_update(group: Group, params: list, optimizer, scaler, scheduler, max_grad_norm: float,
                 finite: bool, set_to_none: bool = True) -> torch.Tensor | None:
    """The update once a step's gradients are in (and averaged): unscale (fp16), clip, step, then
    zero the gradients (in place unless `set_to_none`) and advance the schedule. A non-finite loss
    skips the step (under fp16 the scaler skips it and lowers its scale). Returns the norm before
    clipping, a 0-d tensor, or None."""
    grad_norm = None
    if finite or scaler.is_enabled():
        scaler.unscale_(optimizer)
        if max_grad_norm > 0:
            grad_norm = group.clip_grad_norm(params, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=set_to_none)
    scheduler.step()
    return grad_norm


def make_micro_steps(cfg, model, scaler, device, group: Group, autocast_dtype, position: int = 0) -> MicroSteps:
    """The loop's forward/backward runner: on CUDA with packed batches (one shape throughout) a
    CUDA graph replays the micro-step (train.cuda_graphs), except under fsdp (its hooks gather
    weights per layer) or where the model draws random numbers in checkpointed layers. Hashed
    dropout seeds: micro-batch i of the whole run (all ranks) uses seed i, also after a resume."""
    t = cfg.train
    why = ("train.cuda_graphs=false" if not t.cuda_graphs else "not on a GPU" if device.type != "cuda"
           else "data.packing=false (batch shapes vary)" if not cfg.data.packing
           else "train.strategy=fsdp" if group.fsdp
           else "the model's own dropout draws random numbers" if not getattr(model, "qtune_rng_free", False)
           else None)
    if t.cuda_graphs and why and device.type == "cuda" and group.main:
        print(f"cuda graphs off: {why}", flush=True)
    seed = getattr(model, "qtune_dropout_seed", None)
    if seed is not None:
        seed.fill_(position * group.world + group.rank - group.world)  # MicroSteps adds world per micro-batch
    return MicroSteps(model, scaler, t.grad_accum, device, autocast_dtype, seed, group.world, graphs=why is None)


def train(cfg, resolved: dict) -> dict:
    """Run a training job described by the resolved config; returns a summary."""
    t = cfg.train
    if t.precision not in PRECISIONS:
        raise RunError(f"train.precision {t.precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    for name in ("micro_batch", "grad_accum", "seq_len", "log_every", "save_every", "eval_every", "keep_last"):
        if getattr(t, name) < 1:
            raise RunError(f"train.{name}={getattr(t, name)} must be at least 1")
    # Before torch.distributed starts: once it runs, transformers saves on rank 0 only, and every
    # rank (node) must be able to build its own copy of a generated model.
    ensure_built(cfg.model)
    group = Group(t.strategy)
    if group.fsdp and cfg.quant.enabled and cfg.quant.quant_storage == "uint8":
        # FSDP2 turns each shard into an nn.Parameter, which torch before 2.13 allows only for float
        # dtypes: the packed 4-bit bytes are stored as the compute dtype instead (same bytes)
        cfg.quant.quant_storage = resolved["quant"]["quant_storage"] = cfg.quant.compute_dtype or cfg.model.dtype
        if group.main:
            print(f"train.strategy=fsdp: 4-bit weights stored as {cfg.quant.quant_storage} (quant.quant_storage)",
                  flush=True)
    if group.fsdp and t.precision == "fp16":
        raise RunError("train.strategy=fsdp does not support train.precision=fp16 (its loss scaler does not "
                       "handle sharded gradients); allowed: bf16, fp32")
    device = group.device(pick_device(t.device))
    if device.type == "cuda":
        # Packed batches carry a 4-D mask; cuDNN's attention builds an execution plan per shape and
        # mask, seconds each, also inside gradient checkpointing's recomputation (outside any
        # context manager here): the flash / memory-efficient kernels serve training instead.
        torch.backends.cuda.enable_cudnn_sdp(False)
    out = t.output_dir
    os.makedirs(out, exist_ok=True)
    resume_from = run_state.resolve_resume(t.resume, out)
    if t.memory_limit_gib and device.type == "cuda":
        total_mem = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, t.memory_limit_gib * 2**30 / total_mem), device)
    torch.manual_seed(t.seed)

    model, tokenizer = load_model(cfg, device)
    train_ex, eval_ex = build_datasets(cfg.data, tokenizer, t.seq_len, t.seed)
    autocast_dtype = autocast_dtype_for(t.precision, device)
    mask_dtype = autocast_dtype or torch.float32
    train_items = pack(train_ex, t.seq_len) if cfg.data.packing else train_ex
    eval_items = pack(eval_ex, t.seq_len) if cfg.data.packing else eval_ex
    # packed sequences are padded to seq_len: one batch shape for the whole run
    batches = Batches(train_items, t.micro_batch, t.seed, tokenizer.pad_token_id, mask_dtype,
                      t.seq_len if cfg.data.packing else None, device)
    total = t.max_steps
    if t.epochs:
        total = max(1, math.ceil(t.epochs * batches.per_epoch / (t.grad_accum * group.world)))

    torch.manual_seed(t.seed + 1)  # dropout's stream, the same whatever loading consumed
    group.check_model(model, device)
    saved = run_state.load(resume_from, model, device) if resume_from else None  # before fsdp shards
    group.broadcast_params([p for p in model.parameters() if p.requires_grad])
    group.shard(model, device)
    params = [p for p in model.parameters() if p.requires_grad]  # fsdp: the sharded (DTensor) ones
    optimizer = make_optimizer(cfg, params)
    scheduler = make_schedule(cfg, optimizer, total)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16" and device.type == "cuda")
    step, position = 0, 0
    if saved:
        optimizer.load_state_dict(group.optimizer_state(saved))
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        # the data position is kept as micro-batches consumed by all ranks together; another world
        # size continues from the same global point (rounded down to a multiple of the new world)
        step, position = saved["step"], saved["position"] * saved.get("world", 1) // group.world
        run_state.set_rng_state(saved["rng"])
        print(f"resumed from {resume_from} at step {step}", flush=True)

    logger = MetricsLogger(out, cfg.logger.kind, resolved, cfg.logger.project, cfg.logger.name,
                           list(cfg.logger.tags), resume_step=step) if group.main else None
    log = logger.log if logger else (lambda record: None)
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    trainable = sum(p.numel() for p in params)
    if group.main:
        print(f"training {trainable:,} LoRA parameters for {total} steps on {device} x {group.world} "
              f"({len(train_items)} train / {len(eval_items)} eval items); output in {out}", flush=True)

    from tqdm.auto import tqdm

    micro_steps = make_micro_steps(cfg, model, scaler, device, group, autocast_dtype, position)
    bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, disable=not group.main)
    model.train()
    first_loss, last_loss, bad_steps, window = None, None, 0, []
    t_start, tokens_seen = time.perf_counter(), 0

    def checkpoint() -> str | None:
        path = None
        # ddp: replicas are identical, rank 0 writes for all; fsdp: the LoRA weights are gathered
        # whole and every rank's optimizer shard goes into rank 0's state.pt ("optimizer_shards")
        adapter_state = group.full_trainable_state(model)
        opt = {"optimizer_shards": group.gather_states(optimizer.state_dict()), "strategy": "fsdp"} \
            if group.fsdp else {"optimizer": optimizer.state_dict() if group.main else None}
        if group.main:
            path = run_state.save(out, step, model, {
                **opt, "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "position": position, "world": group.world}, t.keep_last,
                adapter_state=adapter_state)
        group.barrier()
        return path

    try:
        while step < total:
            loss_sum, n_tok = None, 0  # the losses stay on the device: one host sync per step, not per micro-batch
            for _ in range(t.grad_accum):
                batch, n = batches.get(position * group.world + group.rank)
                n_tok += n  # counted on the host: no sync
                batch = _to(batch, device)
                position += 1
                loss = micro_steps(batch)
                loss_sum = loss.double() if loss_sum is None else loss_sum + loss.double()
            loss_val = group.mean(float(loss_sum) / t.grad_accum)
            tokens_seen += n_tok * group.world
            group.average_grads(params)
            if not math.isfinite(loss_val):
                bad_steps += 1
                note = "fp16: step skipped, loss scale lowered" if scaler.is_enabled() else "update skipped"
                print(f"step {step + 1}: non-finite loss ({loss_val}); {note}", flush=True)
                if not scaler.is_enabled():
                    optimizer.zero_grad(set_to_none=micro_steps.set_to_none)
                    if bad_steps >= 3:
                        raise RunError(f"3 consecutive non-finite losses up to step {step + 1}; lower optim.lr "
                                       f"or check the data")
            else:
                bad_steps = 0
            grad_norm = apply_update(group, params, optimizer, scaler, scheduler, cfg.optim.max_grad_norm,
                                     math.isfinite(loss_val), micro_steps.set_to_none)
            step += 1
            bar.update(1)
            if math.isfinite(loss_val):
                window.append(loss_val)
            if (step % t.log_every == 0 or step == total) and window:
                elapsed = time.perf_counter() - t_start
                loss_val = sum(window) / len(window)  # the mean over the steps since the last record
                window.clear()
                first_loss = loss_val if first_loss is None else first_loss
                last_loss = loss_val
                rec = {"step": step, "loss": loss_val, "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                if device.type == "cuda":
                    rec["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                log(rec)
                bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                **({"mem": f"{rec['gpu_mem_gib']:.1f}G"} if "gpu_mem_gib" in rec else {}))
            if eval_items and (step % t.eval_every == 0 or step == total):
                ev = evaluate(model, eval_items, t.micro_batch, tokenizer.pad_token_id, device, autocast_dtype,
                              mask_dtype)
                log({"step": step, "eval_loss": ev, "eval_ppl": math.exp(min(ev, 50))})
            if step % t.save_every == 0 and step < total:
                checkpoint()
            if t.simulate_sigterm_at is not None and step == t.simulate_sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            if stop["signal"] is not None:
                path = checkpoint()
                bar.close()
                if group.main:
                    print(f"interrupted at step {step}: checkpoint {path}; continue with train.resume=auto", flush=True)
                raise SystemExit(128 + stop["signal"])
        bar.close()
        if group.world > 1 and not group.fsdp:  # replicas must agree: a cheap check that the all-reduce kept them so
            sums = group.gather(float(sum(p.detach().double().sum() for p in params)))
            log({"step": step, "rank_param_sums": sums})
            if len(set(sums)) != 1:
                raise RunError(f"ranks disagree on the LoRA weights after step {step}: {sums}")
        log({"step": step, **group.memory_record(model, device)})
        adapter_state = group.full_trainable_state(model)
        adapter = save_final(model, out, resolved, adapter_state) if group.main else None
        group.barrier()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if logger:
            logger.close()
        group.close()
    summary = {"steps": step, "first_loss": first_loss, "last_loss": last_loss, "adapter": adapter,
               "tokens_per_s": tokens_seen / max(time.perf_counter() - t_start, 1e-9)}
    if device.type == "cuda":
        summary["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if group.main:
        print(f"done: {step} steps, loss {first_loss:.4f} -> {last_loss:.4f}; adapter in {adapter}", flush=True)
    return summary


def save_final(model, out: str, resolved: dict, adapter_state: dict | None = None) -> str:
    """The adapter in peft's format with the resolved run config beside it, written atomically.
    `adapter_state`: the trainable weights gathered whole (fsdp), else the model's own are saved."""
    from omegaconf import OmegaConf

    from .atomic import atomic_dir

    final = os.path.join(out, "adapter")
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, state_dict=adapter_state)
        OmegaConf.save(OmegaConf.create(resolved), os.path.join(tmp, "qtune_config.yaml"))
    return final
