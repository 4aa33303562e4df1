"""The training loop for both stages: DDP, AMP, accumulation, AdamW + warmup/cosine, clipping,
non-finite skipping, atomic checkpoints with exact resume, and logging.

Launch: `blip2rt train stage1|stage2|vqa --config FILE`, or under `torchrun --nproc-per-node N -m
blip2rt train ...` (NCCL on GPUs, gloo on CPUs). VQA fine-tuning is stage 3 in the config.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.autograd.graph import increment_version

import blip2rt
from blip2rt import parts
from blip2rt.errors import Blip2rtError, CheckpointError
from blip2rt.kernels import dropout_rng
from blip2rt.precision import training_precision
from blip2rt.pretrained import DTYPES, apply_state

from . import distributed as D
from .checkpoint import complete_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import CaptionDataset, ResumableSampler, ShardDataset
from .feature_cache import FeatureCache
from .stages import stage

log = logging.getLogger(__name__)

VQA_STAGE = parts.VQA  # stage 3: VQA fine-tuning (BLIP-2 §4.2)


class NonFiniteLossError(Blip2rtError):
    pass


def set_trainable(model: nn.Module, stage: int) -> list[str]:
    """Freezes everything but what the stage trains (BLIP-2 §3, blip2rt.parts); returns the trainable names."""
    names = model.trainable_names(stage)
    train = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in train)
    return names


def param_groups(model: nn.Module, weight_decay: float, lr: float, projection_lr: float | None = None) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases, norms and scalars (LAVIS's rule: ndim < 2);
    the language projection in groups of its own when it has its own lr."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            own = projection_lr is not None and parts.part_of(name) == "language_projection"
            groups.setdefault((own, p.ndim >= 2), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": projection_lr if own else lr}
            for (own, decay), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, cfg: TrainConfig, show_progress: bool = True, model: blip2rt.Blip2 | None = None):
        """model: an already built model to train (cfg.model then only names it), e.g. stage 2
        continuing on the stage-1 model in memory; by default cfg.model is loaded."""
        cfg.validate()
        self.cfg = cfg
        self.stage = stage(cfg.stage)
        self.device = self._device()
        D.init_from_env(self.device.type)
        self.is_main = D.rank() == 0
        self.show_progress = show_progress and self.is_main
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + D.rank())
        dropout_rng.reset()  # the fused kernels' seeds start again from the generator just seeded

        frozen = DTYPES[cfg.frozen_dtype] if cfg.frozen_dtype != "auto" else None
        if model is None:
            model = blip2rt.from_pretrained(cfg.model, device=self.device, dtype=frozen, kernels=cfg.kernels,
                                            config=cfg.model_config, seed=cfg.seed, cuda_graphs=False)
        self.model = model
        if cfg.init:
            init = Path(cfg.init)
            init_file = init / "trainable.safetensors" if init.is_dir() else init
            from blip2rt.checkpoint import read_tensor_file

            apply_state(self.model, read_tensor_file(init_file), str(init_file), over_base=True)
        self.trainable = set_trainable(self.model, self.stage.number)
        self.model.train()
        if cfg.activation_checkpointing:
            self.model.qformer.gradient_checkpointing = True

        amp = cfg.amp
        if amp == "auto":
            precision = training_precision(self.device)
            amp = precision.amp
            log.info("amp auto: %s", precision.describe())
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
        self.objective = self.stage.objective(self.model)
        self.module = self.objective
        if cfg.fsdp:
            if not self.stage.uses_llm or not D.is_distributed():
                raise Blip2rtError("fsdp shards the frozen LLM of stage 2 (or VQA) across processes: use it there "
                                   "under torchrun with 2 or more processes")
            n = D.shard_llm_layers(self.model.language_model)
            log.info("sharded %d LLM layers across %d processes", n, D.world_size())
        if D.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            # the frozen LLM (possibly sharded) is not DDP's business: nothing of it trains
            held = [*self.objective.named_parameters(), *self.objective.named_buffers()]
            frozen = [n for n, _ in held if n.startswith("model.") and parts.part_of(n[len("model."):]) == "llm"]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.objective, frozen)
            self.module = nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)
        self.ddp = self.module if isinstance(self.module, nn.parallel.DistributedDataParallel) else None
        self.module = self._compiled(self.module)
        projection_lr = cfg.projection_lr if self.stage.uses_llm else None
        # fused: one kernel for every tensor, and it skips a step on the device (found_inf) without a host sync
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay, cfg.lr, projection_lr), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), fused=True)
        self._trained = [p for p in self.model.parameters() if p.requires_grad]
        ratio = cfg.min_lr / cfg.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.max_steps, ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.dataset, self.sampler, self.loader = self._data()
        self.step, self.epoch, self.position = 0, 0, 0
        self.nonfinite_total = self.nonfinite_run = self.skipped_images = 0  # host copies, read at log steps
        self._skipped_total = torch.zeros((), device=self.device)  # on the device, updated every step
        self._skipped_run = torch.zeros((), device=self.device)
        if cfg.resume:
            self._resume()

    def _resume(self) -> None:
        """From the newest checkpoint that reads; an unreadable one (a corrupt state.pt, say) is
        reported and the one before it used, so nothing but the steps since is lost."""
        failed = []
        for ckpt in complete_checkpoints(self.out_dir):
            try:
                state = load_checkpoint(ckpt, self.model)
            except CheckpointError as e:
                log.warning("cannot resume from %s: %s; trying the checkpoint before it", ckpt, e)
                failed.append(f"{ckpt.name}: {e}")
                continue
            self._restore(state)
            log.info("resumed from %s at step %d", ckpt, self.step)
            if failed:
                log.warning("resumed from %s, an older checkpoint: %d newer could not be read", ckpt, len(failed))
            return
        if failed:
            raise CheckpointError(f"no checkpoint in {self.out_dir / 'checkpoints'} could be read:\n  " +
                                  "\n  ".join(failed) + "\nmove the folder aside to start afresh, or set resume=false")

    # ---- setup ----------------------------------------------------------------------------

    def _compiled(self, module):
        """cfg.compile: the micro-step's forward (and through AOTAutograd its backward) under
        torch.compile. The stage objectives run with no graph break and no host sync
        (tests/test_no_host_sync.py), so each is one graph; reduce-overhead replays it as a CUDA graph."""
        mode = self.cfg.compile
        if mode == "none":
            return module
        if mode == "reduce-overhead" and self.device.type != "cuda":
            raise Blip2rtError("compile=reduce-overhead captures CUDA graphs: it needs a CUDA device; use "
                               "compile=default on the CPU")
        log.info("compiling the training step (torch.compile, mode %s): the first steps include the compile", mode)
        return torch.compile(module, mode=mode)

    def _device(self) -> torch.device:
        if torch.cuda.is_available():
            import os

            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")

    def _data(self):
        cfg, m = self.cfg, self.model
        size = cfg.image_size or m.config.vision_config.image_size
        norm = (m.config.vision_config.image_mean, m.config.vision_config.image_std)
        collate = self.stage.collate(m, cfg)
        if cfg.shards:
            ds = ShardDataset(cfg.shards, size, cfg.augment, cfg.max_words, cfg.seed, D.rank(), D.world_size(), norm)
            loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, collate_fn=collate,
                                                 num_workers=cfg.num_workers,
                                                 generator=torch.Generator().manual_seed(cfg.seed))
            return ds, None, loader
        cache = None
        if cfg.cache_features:
            folder = Path(cfg.feature_cache) if cfg.feature_cache else self.out_dir / "feature_cache"
            if not FeatureCache.exists(folder):
                from .data import load_annotations

                images = [r["image"] for r in load_annotations(cfg.annotations, self.stage.fields)]
                if self.is_main:
                    FeatureCache.build(m, images, cfg.image_root, folder, show_progress=self.show_progress)
                if D.is_distributed():
                    torch.distributed.barrier()
            cache = FeatureCache(folder)
        ds = CaptionDataset(cfg.annotations, cfg.image_root, size, cfg.augment, cfg.max_words, cfg.seed, cache, norm,
                            vqa=self.stage.vqa)
        sampler = ResumableSampler(len(ds), cfg.seed, D.rank(), D.world_size())
        # Its own generator: making an iterator draws a seed, which must not move the global RNG
        # (dropout, negatives), or a resumed run would diverge from an uninterrupted one.
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                                             num_workers=cfg.num_workers, drop_last=False,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        return ds, sampler, loader

    # ---- state ----------------------------------------------------------------------------

    def _state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                "position": self.position, "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
                "skipped_images": self.skipped_images, "rng": rng_state(), "stage": self.stage.number,
                "compile": self.cfg.compile}

    def _restore(self, state: dict) -> None:
        if state.get("stage") != self.stage.number:
            raise Blip2rtError(f"the checkpoint in {self.out_dir} is from stage {state.get('stage')}, not "
                               f"stage {self.stage.number}; use another out_dir or resume=false")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.nonfinite_total, self.skipped_images = state["nonfinite_total"], state["skipped_images"]
        self.nonfinite_run = state.get("nonfinite_run", 0)
        saved_compile = state.get("compile", "none")
        if saved_compile != self.cfg.compile:
            log.info("the checkpoint trained with compile=%s; continuing with compile=%s (the same model, "
                     "within rounding)", saved_compile, self.cfg.compile)
        self._skipped_total.fill_(self.nonfinite_total)
        self._skipped_run.fill_(self.nonfinite_run)
        set_rng_state(state["rng"])

    def save(self) -> Path | None:
        self._read_counters()
        path = None
        if self.is_main:
            path = save_checkpoint(self.out_dir, self.step, self.model, self._state(), self.cfg.keep_checkpoints,
                                   stage=self.stage.number)
        if D.is_distributed():
            torch.distributed.barrier()
        return path

    # ---- the loop -------------------------------------------------------------------------

    def _batches(self):
        """Endless batches; tracks (epoch, position) so a checkpoint can say where the data stood."""
        while True:
            self.dataset.epoch = self.epoch
            if self.sampler is not None:
                self.sampler.set_position(self.epoch, self.position)
            for batch in self.loader:
                self.position += batch.size + batch.skipped
                self.skipped_images += batch.skipped
                if batch.size > 0:
                    yield batch
            self.epoch += 1
            self.position = 0

    def run(self, until: int | None = None) -> dict:
        """Trains to cfg.max_steps (or to step `until`, then saves: a deliberate stop); returns the last metrics."""
        cfg = self.cfg
        stop = min(cfg.max_steps, until) if until is not None else cfg.max_steps
        metrics_file = (self.out_dir / "metrics.jsonl").open("a") if self.is_main else None
        writer = self._tensorboard()
        from tqdm.auto import tqdm

        desc = self.stage.name
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=desc, unit="step", disable=not self.show_progress,
                   dynamic_ncols=True)
        batches = self._batches()
        last = {}
        t0, samples = time.perf_counter(), 0
        while self.step < stop:
            losses, grad_norm, size = self._step(batches)
            samples += size
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            bar.update(1)

            if self.step % cfg.log_every == 0 or self.step == stop:
                self._read_counters()  # the one read-back of a step, at log steps only
                elapsed = time.perf_counter() - t0
                last = {"step": self.step, **{k: round(float(v), 5) for k, v in losses.items()},
                        "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                        "samples_per_s": round(samples * D.world_size() / max(elapsed, 1e-9), 2),
                        "skipped_steps": self.nonfinite_total, "skipped_images": self.skipped_images,
                        "epoch": self.epoch}
                t0, samples = time.perf_counter(), 0
                bar.set_postfix(loss=f"{losses['loss']:.4f}", sps=last["samples_per_s"])
                if metrics_file:
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                if writer:
                    for k, v in last.items():
                        if isinstance(v, (int, float)) and k != "step":
                            writer.add_scalar(f"train/{k}", v, self.step)
            if self.step % cfg.save_every == 0 or self.step == stop:
                self.save()
        bar.close()
        if metrics_file:
            metrics_file.close()
        if writer:
            writer.close()
        return last

    def _step(self, batches) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        """One optimiser step over cfg.grad_accum micro-batches, with nothing read back to the host:
        the losses and the grad norm stay on the device (tensors), and a step whose loss or grads are
        not finite is skipped by the fused optimiser itself (its found_inf), which neither moves the
        weights nor counts the step. Returns the losses, the grad norm and the samples it took."""
        cfg = self.cfg
        losses: dict[str, torch.Tensor] = {}
        size = 0
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            size += batch.size
            sync = micro == cfg.grad_accum - 1 or self.ddp is None
            ctx = nullcontext() if sync else self.ddp.no_sync()
            autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
            with ctx, autocast:
                out = self.module(batch.objective_inputs)
            with ctx:
                self.scaler.scale(out["loss"] / cfg.grad_accum).backward()
            for k, v in out.items():
                losses[k] = losses.get(k, 0.0) + v.detach().float() / cfg.grad_accum
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                   cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        found = (~(torch.isfinite(losses["loss"]) & torch.isfinite(grad_norm))).float()
        if D.is_distributed():  # every rank skips a step that any rank cannot take
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # fp16: its own found_inf, from the grads
        else:
            self.optimizer.grad_scale, self.optimizer.found_inf = None, found
            self.optimizer.step()
        self.scaler.update()
        # the fused AdamW writes the weights without bumping their version counters, which the
        # stacked-weight caches of inference (qformer.PackedLinears) read to see a change
        for p in self._trained:
            increment_version(p)
        self._skipped_run = (self._skipped_run + found) * found  # consecutive skipped steps; 0 after a good one
        self._skipped_total += found
        return losses, grad_norm, size

    def _read_counters(self) -> None:
        """Reads the skipped-step counters back to the host (log and checkpoint steps), warns of
        skipped steps, and stops after cfg.max_nonfinite in a row."""
        total, run = int(self._skipped_total), int(self._skipped_run)
        if total > self.nonfinite_total:
            log.warning("step %d: %d step(s) skipped since the last log for a non-finite loss or gradient (%d in a "
                        "row)", self.step, total - self.nonfinite_total, run)
        self.nonfinite_total, self.nonfinite_run = total, run
        if run >= self.cfg.max_nonfinite:
            raise NonFiniteLossError(
                f"stopping: {run} consecutive steps had a non-finite loss or gradient (last at step {self.step}); "
                f"the last good checkpoint is in {self.out_dir / 'checkpoints'}. Lower the lr, use bf16 instead of "
                "fp16, or check the data")

    def _tensorboard(self):
        if not self.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"))
