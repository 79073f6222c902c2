"""``model train``: one training loop for every recipe (``setup`` → ``train`` → ``save_checkpoint`` → ``cleanup``).

Notation: ``N`` clips of a micro-step, ``C`` classes, ``L`` tokens of a micro-step. A *step* is one
optimizer update; it may accumulate several micro-steps until ``optim.grad_accum_tokens`` tokens (counted
over all ranks) have been seen. ``stage_step`` restarts at 0 in every coarse-to-fine phase (the lr
schedule is a pure function of it, :func:`model.schedule.lr_at`).

Outputs under ``run.out_dir``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/step_*`` (full
state, atomic), ``checkpoints/epoch_*`` (weights, for AST weight averaging), ``final/`` (weights to
evaluate or predict with), ``averaged/`` and ``ema/`` when asked for, ``tb/`` if TensorBoard is
importable, and ``report.md``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from flexast.model import adapter
from flexast.model import step as step_io
from flexast.model.averaging import EMA, average_checkpoints
from flexast.model.checkpoint import load_checkpoint
from flexast.model.config import Config
from flexast.model.data import open_data, shifts_of, stream_config, training_stats
from flexast.model.evaluate import evaluate_source
from flexast.model.flops import train_flops
from flexast.model.losses import kd_loss, supervised_loss
from flexast.model.recipes import Stage, build_model, move_to_stage, plan_stages
from flexast.model.run_dir import RunDir, TrainState, load_train_extra, load_train_state, restore_rng
from flexast.model.schedule import lr_at
from flexast.pipeline.datasource import Source, label_map
from flexast.pipeline.errors import ConfigError
from flexast.pipeline.loader import make_loader


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


class Trainer:
    """A training run of ``cfg``; ``resume=True`` continues from the newest step checkpoint in ``run.out_dir``.

    ``train_data`` / ``valid_data`` may be given directly as sources (tests); otherwise they are opened
    from ``data.train`` / ``data.valid`` (:func:`model.data.open_data`), which fails, naming the path,
    before any step when a path names nothing or no clips.
    """

    def __init__(
        self,
        cfg: Config,
        resume: bool = False,
        train_data: Source | None = None,
        valid_data: Source | None = None,
    ):
        self.cfg, self.resume = cfg, resume
        self.train_data, self.valid_data = train_data, valid_data
        self.run = RunDir(cfg.run.out_dir)
        self.log_file = None
        self.tb = None
        self.flops_spent = 0.0
        self.tokens_seen = 0
        self.wall_start = time.perf_counter()
        self.history: list[dict] = []
        self._last_eval: tuple[int, dict] = (-1, {})
        self._shadow = None  # the last batch this rank trained on (model.step: ranks with unequal step counts)

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = _device(cfg.run.device, local_rank)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)
        self.is_main = self.rank == 0
        self.reducer = step_io.HostReducer(self.world)
        self._threads_before = torch.get_num_threads()
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed + self.rank)
        if self.train_data is None:
            self.train_data = open_data(cfg.data.train, "data.train", cfg.data.loader)
        if self.valid_data is None and cfg.data.valid:
            self.valid_data = open_data(cfg.data.valid, "data.valid", "memory", cfg.eval.max_clips)
        self.vocab = self.train_data.label_names
        self.n_classes = len(self.vocab)
        if not self.n_classes:
            raise ConfigError(f"data.train={self.train_data.spec!r}: its index.json lists no label names")
        if self.valid_data is not None:  # held-out labels matched by name: an unknown one fails here, before any step
            counts = self.valid_data.index.get("labels", {}).get("counts")
            label_map(self.valid_data.label_names, self.vocab, f"data.valid={self.valid_data.spec!r}", counts)
        if not cfg.data.norm and not self.train_data.index.get("stats"):
            raise ConfigError(f"data.train={self.train_data.spec!r}: no statistics in its index.json; set data.norm")
        self.stages = plan_stages(cfg, shifts_of(self.train_data))
        n_mels = int(self.train_data.index.get("n_mels", cfg.model.n_mels))
        self.model = build_model(cfg, self.n_classes, n_mels).to(self.device)
        self.teacher = None
        if cfg.recipe.kd.teacher:
            self.teacher = load_checkpoint(cfg.recipe.kd.teacher, self.device)
            self.teacher.eval().requires_grad_(False)
        self.state = TrainState()
        if self.is_main:
            self.run.create(cfg)
        ckpt = self.run.latest_step() if self.resume else None
        if self.resume and ckpt is None and self.is_main:
            print(f"--resume: no checkpoint under {self.run.checkpoints}; starting from scratch")
        self._enter_stage(0 if ckpt is None else None, ckpt)
        if self.is_main:
            self.log_file = open(self.run.metrics, "a")  # noqa: SIM115 - closed in cleanup()
            if cfg.run.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(self.run.tensorboard))
                except ImportError:
                    self.tb = None

    def _make_loader(self, stage: Stage):
        """The stage's loader over the training source (one loader for every source and recipe)."""
        m = self.cfg.model
        stride = (m.fstride or stage.patches[0][0], m.tstride or stage.patches[0][1])
        opts = stream_config(self.cfg, stage, self.cfg.run.seed + 1000 * self.state.stage, stride)
        return make_loader(opts, self.train_data, rank=self.rank, world_size=self.world)

    def _stage_total_steps(self, stage: Stage, first_epoch: int) -> int:
        """Optimizer steps of the stage: ``optim.steps``, else ``epochs`` passes over the data, counted exactly
        (the loader plans each epoch's steps before it starts); the same whenever the run was interrupted."""
        if stage.steps > 0:
            return stage.steps
        if self.cfg.optim.steps_per_epoch:
            return max(1, math.ceil(stage.epochs * self.cfg.optim.steps_per_epoch))
        whole = int(stage.epochs)
        total = sum(self._epoch_steps(first_epoch + e) for e in range(whole))
        if stage.epochs > whole:
            total += math.ceil((stage.epochs - whole) * self._epoch_steps(first_epoch + whole))
        return max(1, total)

    def _epoch_steps(self, epoch: int) -> int:
        """Optimizer steps of one epoch: its loader steps (equal on every rank), or with ``grad_accum_tokens``
        an estimate from them (full budgets; the same on every rank)."""
        n = self.loader.steps_in_epoch(epoch)
        target = self.cfg.optim.grad_accum_tokens
        if not target:
            return n
        return max(1, math.ceil(n * self.world * self.cfg.data.token_budget / target))

    def _enter_stage(self, index: int | None, ckpt: Path | None) -> None:
        """Start stage ``index`` fresh, or restore everything from ``ckpt`` (then the stage is the checkpoint's)."""
        if ckpt is not None:
            self.state = load_train_state(ckpt)
            index = self.state.stage
        stage = self.stages[index]
        self.state.stage = index
        if ckpt is not None:  # the checkpoint's model config carries the stage's geometry
            self.model = load_checkpoint(ckpt, self.device)
        else:  # kernel and positions interpolated to this stage's grid
            self.model = move_to_stage(self.model, stage, self.cfg).to(self.device)
        self.loader = self._make_loader(stage)
        first_epoch = self.state.epoch
        self._shadow = None  # a batch of this stage's geometry (model.step)
        if ckpt is not None:
            first_epoch = int(self.state.loader.get("stage_first_epoch", self.state.epoch))
            if self.state.loader:
                self.loader.load_state_dict(self.state.loader)
        self.stage_first_epoch = first_epoch
        self.steps_per_epoch = self.cfg.optim.steps_per_epoch or self._epoch_steps(first_epoch)
        self.total_steps = self._stage_total_steps(stage, first_epoch)
        self.ddp_model = self.model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.cfg.run.find_unused,
            )
        if self.cfg.run.compile:  # the encoder blocks only: see model.step.compile_model
            step_io.compile_model(self.model)
        self.compiled = self.ddp_model
        o = self.cfg.optim
        opt_cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=o.lr,
            betas=tuple(o.betas),
            weight_decay=o.weight_decay,
        )
        self.ema = EMA(self.model, o.ema) if o.ema > 0 else None
        if ckpt is not None:
            ts = load_train_extra(ckpt, self.device)
            self.optimizer.load_state_dict(ts["optimizer"])
            if self.ema is not None and "ema" in ts:
                self.ema.load_state_dict(ts["ema"])
            restore_rng(ts, self.device)
            self.flops_spent, self.tokens_seen = self.state.flops, self.state.tokens

    # ---- one update -----------------------------------------------------------------------------

    def _lr(self) -> float:
        o = self.cfg.optim
        return lr_at(
            self.state.stage_step,
            base_lr=o.lr,
            warmup_steps=min(o.warmup_steps, max(0, self.total_steps - 1)),
            schedule=o.schedule,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            decay_start_epoch=o.decay_start_epoch,
            decay_every=o.decay_every,
            decay_factor=o.decay_factor,
            min_lr=o.min_lr,
        )

    def _loss(self, batch, stage: Stage) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss over the micro-step's clips, and the ``(N, C)`` logits."""
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else _null()
        with autocast:
            logits = adapter.logits(self.compiled, batch, self.cfg)
            loss_name = self.cfg.optim.loss
            if loss_name == "auto":
                loss_name = "ce" if self.cfg.data.labels == "single" else "bce"
            loss = supervised_loss(logits.float(), batch.labels, loss_name)
            if stage.kd and self.teacher is not None:
                with torch.no_grad():
                    t_logits = adapter.teacher_logits(self.teacher, batch, self.cfg)
                kd = self.cfg.recipe.kd
                loss = (1 - kd.alpha) * loss + kd.alpha * kd_loss(
                    logits.float(), t_logits.float(), kd.temperature, loss_name
                )
        return loss, logits

    def _update(self, batches, stage: Stage) -> dict:
        """Accumulate micro-steps from ``batches`` until enough tokens, then one optimizer step.

        Ranks, syncs and the non-finite guard: see :mod:`model.step`. Returns ``{}`` when every rank's
        loader is exhausted before the step's first micro-step (the epoch is over).
        """
        self.ddp_model.train()
        target = self.cfg.optim.grad_accum_tokens
        acc_tokens = acc_clips = 0.0
        loss_sum = torch.zeros((), device=self.device)
        local_clips, fill, micro = 0, [], []
        n_micro, ddp_synced = 0, False
        while True:
            batch = next(batches, None)
            tokens = 0 if batch is None else step_io.host_tokens(batch)
            clips = 0 if batch is None else batch.n_clips
            # a rank out of data while others are not runs its previous batch with weight 0, so that every rank
            # runs every forward and backward DDP expects (its bucket rebuild, its all-reduces); a rank that never
            # had a batch skips, and then the step's gradients are averaged by hand
            run = batch if batch is not None else self._shadow
            g_tokens, g_clips, g_have, g_skip = self.reducer.sum(tokens, clips, batch is not None, run is None)
            if g_have == 0:  # every rank is out of data
                break
            last = acc_tokens + g_tokens >= target
            ddp_synced = last and g_skip == 0
            if batch is not None:
                self._shadow = batch
                self.flops_spent += float(train_flops(self.model.config, batch)) * self.world
                if not self.cfg.data.pad_to:
                    fill.append(tokens / (self.cfg.data.token_budget or tokens))
            if run is not None:
                sync = _null() if ddp_synced or self.world == 1 else self.ddp_model.no_sync()
                with sync:
                    loss, logits = self._loss(step_io.to_device(run, self.device), stage)
                    (loss * clips).backward()
            if batch is not None:
                loss_sum += loss.detach() * clips
                micro.append(step_io.micro_record(batch.keys, loss, logits))
                local_clips += clips
            acc_tokens += g_tokens
            acc_clips += g_clips
            n_micro += 1
            if last:
                break
        if n_micro == 0:
            return {}
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.world > 1 and not ddp_synced:  # the epoch ended before the last micro-step, or a rank skipped it
            step_io.all_reduce_gradients(params, self.world)
        scale = self.world / max(1.0, acc_clips)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
        gnorm = step_io.grad_norm(params, self.cfg.optim.grad_clip)
        loss_total, _ = step_io.read_step(self.state.step + 1, loss_sum, gnorm, micro)
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.tokens_seen += int(acc_tokens)
        return {
            "loss": loss_total / max(1, local_clips),
            "tokens": int(acc_tokens),
            "fill": sum(fill) / len(fill) if fill else 1.0,
            "lr": lr,
        }

    # ---- the loop -------------------------------------------------------------------------------

    def train(self, stop_after: int | None = None) -> dict:
        """Run every stage to its end (or stop after ``stop_after`` more steps: a simulated kill)."""
        cfg = self.cfg
        bar = None
        done_now = 0
        last_metrics: dict = {}
        while self.state.stage < len(self.stages):
            stage = self.stages[self.state.stage]
            if self.is_main and cfg.run.progress and bar is None:
                from tqdm import tqdm

                estimate = stage.steps <= 0 and (cfg.optim.steps_per_epoch or cfg.optim.grad_accum_tokens)
                desc = f"{stage.name} (~{self.total_steps} steps, estimated)" if estimate else stage.name
                bar = tqdm(total=self.total_steps, initial=self.state.stage_step, desc=desc, dynamic_ncols=True)
            t0 = time.perf_counter()
            while self.state.stage_step < self.total_steps:
                self.loader.set_epoch(self.state.epoch)
                it = iter(self.loader)
                while self.state.stage_step < self.total_steps:
                    info = self._update(it, stage)
                    if not info:  # epoch exhausted
                        self._end_epoch(stage)
                        break
                    self.state.stage_step += 1
                    self.state.step += 1
                    done_now += 1
                    dt = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    info.update(step=self.state.step, stage=stage.name, epoch=self.state.epoch)
                    info["tokens_per_s"] = info["tokens"] / max(dt, 1e-9)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(
                            loss=f"{info['loss']:.4f}",
                            tok_s=f"{info['tokens_per_s']:.0f}",
                            fill=f"{info['fill']:.3f}",
                            lr=f"{info['lr']:.2e}",
                        )
                    if self.state.step % max(1, cfg.run.log_every) == 0 or self.state.stage_step == 1:
                        self._log(info)
                    self.history.append(info)
                    if cfg.eval.every and self.state.step % cfg.eval.every == 0:
                        last_metrics = self._evaluate(stage) or last_metrics
                    self.state.loader = self._loader_state()
                    if cfg.run.ckpt_every and self.state.step % cfg.run.ckpt_every == 0:
                        self.save_checkpoint()
                    if stop_after is not None and done_now >= stop_after:
                        if bar is not None:
                            bar.close()
                        return {"stopped_at": self.state.step}
                else:
                    # The stage's steps are done: close the epoch if the loader is exactly at its end
                    # (epoch-driven stages), else remember where the loader is.
                    at_end = self.loader.at_epoch_end()
                    if self.reducer.sum(at_end)[0] == self.world:  # every rank's loader (unequal counts: model.step)
                        self._end_epoch(stage)
                    self.state.loader = self._loader_state()
            if bar is not None:
                bar.close()
                bar = None
            done = self._last_eval[1] if self._last_eval[0] == self.state.step else self._evaluate(stage)
            last_metrics = done or last_metrics
            self._save_weights(self.run.stage(self.state.stage))
            if self.state.stage + 1 < len(self.stages):
                self.state.stage += 1
                self.state.stage_step = 0
                self.state.loader = {}
                self._enter_stage(self.state.stage, None)
            else:
                self.state.stage += 1
        return self._finish(last_metrics)

    def _loader_state(self) -> dict:
        return {**self.loader.state_dict(), "stage_first_epoch": self.stage_first_epoch}

    def _end_epoch(self, stage: Stage) -> None:
        self.state.epoch += 1
        self.state.loader = self._loader_state()
        if self.is_main:
            self._save_weights(self.run.epoch(self.state.epoch))
        if not self.cfg.eval.every:
            self._evaluate(stage)

    def _evaluate(self, stage: Stage) -> dict:
        if self.valid_data is None or not self.is_main:
            return {}
        if self._last_eval[0] == self.state.step:
            return self._last_eval[1]
        res = stage.resolutions[0]
        d = self.cfg.data
        stats = self.train_data.index.get("stats", {})
        norm = tuple(d.norm) if d.norm else {k: (v["mean"], v["std"]) for k, v in stats.items()}
        metrics = evaluate_source(
            self.model,
            self.valid_data,
            self.cfg,
            patch=stage.eval_patch,
            resolution=res,
            max_frames=d.eval_max_frames or stage.max_frames,
            device=self.device,
            vocab=self.vocab,
            norm=norm,  # the training statistics, as model predict and model eval use
        )
        row = {"step": self.state.step, "stage": stage.name, "split": "valid", **metrics}
        self._log(row)
        self._last_eval = (self.state.step, metrics)
        return metrics

    def _log(self, row: dict) -> None:
        if not self.is_main or self.log_file is None:
            return
        self.log_file.write(json.dumps(row) + "\n")
        self.log_file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row.get('split', 'train')}/{k}", v, row["step"])

    # ---- checkpoints ----------------------------------------------------------------------------

    def _save_weights(self, path: Path) -> None:
        if self.is_main:
            self.run.save_weights(path, self.model, self.cfg, self._labels())

    def _labels(self) -> dict:
        """What ``labels.json`` records: class names and the feature recipe of the training data."""
        index = self.train_data.index
        labels = index.get("labels", {})
        build = index.get("config", {})
        return {
            "names": self.vocab,
            "display_names": list(labels.get("display_names", self.vocab)),
            "labels": self.cfg.data.labels,
            "stats": training_stats(self.train_data) if index.get("stats") else {},
            "norm": list(self.cfg.data.norm),
            "features": dict(build.get("features", {})),
            "sample_rate": int(index.get("sample_rate", build.get("sample_rate", 16000))),
        }

    def save_checkpoint(self) -> Path | None:
        """Atomic full-state checkpoint ``checkpoints/step_XXXXXXXX`` (model, optimizer, loader, RNG, step, stage)."""
        self.state.flops, self.state.tokens = self.flops_spent, self.tokens_seen
        if not self.is_main:
            if self.world > 1:
                dist.barrier()
            return None
        extra = {"optimizer": self.optimizer.state_dict()}
        if self.ema is not None:
            extra["ema"] = self.ema.state_dict()
        path = self.run.save_step(
            self.state, self.model, self.cfg, self._labels(), extra, self.device, keep_last=self.cfg.run.keep_last
        )
        if self.world > 1:
            dist.barrier()
        return path

    def _finish(self, metrics: dict) -> dict:
        wall = time.perf_counter() - self.wall_start
        result = {"steps": self.state.step, "wall_s": wall, "flops": self.flops_spent, "valid": metrics}
        if self.is_main:
            self._save_weights(self.run.final)
            o = self.cfg.optim
            if self.ema is not None:
                self.ema.copy_to(self.model)
                self._save_weights(self.run.ema)
                result["valid_ema"] = self._evaluate(self.stages[-1])
            if o.average:
                paths = self.run.epochs(*o.average)
                if paths:
                    average_checkpoints(self.model, paths)
                    self._save_weights(self.run.averaged)
                    result["valid_averaged"] = self._evaluate(self.stages[-1])
            from flexast.model.report import write_train_report

            write_train_report(self.run.report, self.cfg, result, self.history)
            self.run.write_result(result)
        return result

    def cleanup(self) -> None:
        if getattr(self, "_threads_before", None):
            torch.set_num_threads(self._threads_before)
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        if self.tb is not None:
            self.tb.close()
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train(cfg: Config, resume: bool = False, **data) -> dict:
    """Library entry point of ``model train``: set up, train every stage, write the report, clean up."""
    trainer = Trainer(cfg, resume=resume, **data)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()


def remove_run(out_dir: str | Path) -> None:
    """Delete a run folder (used by the demo to start clean)."""
    RunDir(out_dir).remove()
