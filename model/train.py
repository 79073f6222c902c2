"""``model train``: one recipe loop for every recipe (``setup`` → ``train`` → ``save_checkpoint`` → ``cleanup``).

Notation: ``N`` clips of a micro-step, ``C`` classes, ``L`` tokens of a micro-step. A *step* is one
optimizer update; it may accumulate several micro-steps until ``optim.grad_accum_tokens`` tokens (counted
over all ranks) have been seen. A run is a list of *stages* (:mod:`model.recipes`: one for ast, flexiast and
elasticast, one per coarse-to-fine phase); ``stage_step`` restarts at 0 in every stage (the lr schedule is a
pure function of it, :func:`model.schedule.lr_at`).

Where things live: ranks and devices in :mod:`model.distributed`, the optimizer step (micro-steps, ranks out of
data, gradient averaging) in :mod:`model.step`, the loss in :mod:`model.losses`, held-out metrics in
:mod:`model.evaluate`, the run folder in :mod:`model.run_dir`, logging in :mod:`model.metric_log`, the model of
each stage in :mod:`model.recipes`.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

from flexast.model import step as step_io
from flexast.model.averaging import EMA, average_checkpoints
from flexast.model.checkpoint import load_checkpoint
from flexast.model.config import Config, DataConfig, ModelSection, OptimConfig
from flexast.model.data import check_sources, labels_info, model_input, open_data, shifts_of, stream_config
from flexast.model.distributed import Ranks
from flexast.model.evaluate import evaluate_stage
from flexast.model.losses import train_loss
from flexast.model.metric_log import MetricLog
from flexast.model.recipes import Stage, build_model, move_to_stage, plan_stages
from flexast.model.report import write_train_report
from flexast.model.run_dir import RunDir, TrainState, load_train_state, restore_train_extra
from flexast.model.schedule import epoch_steps, optim_lr, stage_steps
from flexast.pipeline.datasource import Source
from flexast.pipeline.loader import make_loader


class Trainer:
    """A training run of ``cfg``; ``resume=True`` continues from the newest step checkpoint in ``run.out_dir``.

    ``train_data`` / ``valid_data`` may be given directly as sources (tests); otherwise they are opened
    from ``data.train`` / ``data.valid`` (:func:`model.data.open_data`), which fails, naming the path,
    before any step when a path names nothing or no clips.
    """

    def __init__(self, cfg: Config, resume: bool = False, train_data: Source | None = None, valid_data=None):
        self.cfg, self.resume = cfg, resume
        self.train_data, self.valid_data = train_data, valid_data
        self.run = RunDir(cfg.run.out_dir)
        self.ranks = Ranks()
        self.device = self.ranks.device
        self.log = MetricLog(None)
        self.state = TrainState()
        self.stepper: step_io.StepRunner | None = None  # the stage's optimizer steps (model.step)
        self.wall_start = time.perf_counter()
        self.history: list[dict] = []
        self.last_metrics: dict = {}
        self._last_eval: tuple[int, dict] = (-1, {})
        self._threads_before = torch.get_num_threads()

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Ranks, data, model, run folder; then the first stage (or the checkpoint's, with ``resume``)."""
        cfg = self.cfg
        self.ranks = Ranks.start(cfg.run.device)
        self.device = self.ranks.device
        self.reducer = step_io.HostReducer(self.ranks.world)
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed + self.ranks.rank)
        self._setup_data(cfg.data)
        self._setup_model(cfg.model)
        if self.ranks.is_main:
            self.run.create(cfg)
        ckpt = self.run.latest_step() if self.resume else None
        if self.resume and ckpt is None and self.ranks.is_main:
            print(f"--resume: no checkpoint under {self.run.checkpoints}; starting from scratch")
        if ckpt is not None:
            self.state = load_train_state(ckpt)
        self._start_stage(self.state.stage, ckpt)
        if self.ranks.is_main:
            tb = self.run.tensorboard if cfg.run.tensorboard else None
            self.log = MetricLog(self.run.metrics, tb, cfg.run.progress)

    def _setup_data(self, d: DataConfig) -> None:
        """The training and held-out sources, checked before any step, and the recipe's stages."""
        if self.train_data is None:
            self.train_data = open_data(d.train, "data.train", d.source)
        if self.valid_data is None and d.valid:
            self.valid_data = open_data(d.valid, "data.valid", "memory", self.cfg.eval.max_clips)
        check_sources(self.train_data, self.valid_data, d.loader)
        self.vocab = self.train_data.label_names
        self.stages = plan_stages(self.cfg, shifts_of(self.train_data))

    def _setup_model(self, m: ModelSection) -> None:
        """A fresh model (initialised from ``model.init`` when given) and the frozen KD teacher, if any."""
        n_mels = int(self.train_data.index.get("n_mels", m.n_mels))
        self.model = build_model(self.cfg, len(self.vocab), n_mels).to(self.device)
        self.teacher = None
        if self.cfg.recipe.kd.teacher:
            self.teacher = load_checkpoint(self.cfg.recipe.kd.teacher, self.device)
            self.teacher.eval().requires_grad_(False)

    def _setup_loader(self, d: DataConfig, stage: Stage):
        """The stage's loader over the training source (one loader for every source and recipe)."""
        m = self.cfg.model
        stride = (m.fstride or stage.patches[0][0], m.tstride or stage.patches[0][1])
        opts = stream_config(self.cfg, stage, self.cfg.run.seed + 1000 * self.state.stage, stride)
        return make_loader(opts, self.train_data, rank=self.ranks.rank, world_size=self.ranks.world)

    def _epoch_steps(self, epoch: int) -> int:
        """Optimizer steps of epoch ``epoch`` (:func:`model.schedule.epoch_steps`; the same on every rank)."""
        o, lc = self.cfg.optim, self.cfg.data.loader
        return epoch_steps(self.loader.steps_in_epoch(epoch), o.grad_accum_tokens, lc.budget_tokens, self.ranks.world)

    def _setup_optimizer(self, o: OptimConfig, ckpt: Path | None) -> None:
        """A fresh optimizer (and EMA) per stage, or the checkpoint's states (RNG included); the stage's steps."""
        flops, tokens = (self.stepper.flops, self.stepper.tokens) if self.stepper else (0.0, 0)
        opt_cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = opt_cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.ema = EMA(self.model, o.ema) if o.ema > 0 else None
        if ckpt is not None:
            restore_train_extra(ckpt, self.device, self.optimizer, self.ema)
            flops, tokens = self.state.flops, self.state.tokens
        parts = (self.model, self.ddp_model, self.optimizer, self.ema, self.reducer)
        self.stepper = step_io.StepRunner(*parts, o, self.cfg.data.loader, flops=flops, tokens=tokens)

    def _start_stage(self, index: int, ckpt: Path | None) -> None:
        """Stage ``index``: the model at its geometry (or the checkpoint's), its loader, DDP and optimizer."""
        stage = self.stages[index]
        self.state.stage = index
        if ckpt is not None:  # the checkpoint's model config carries the stage's geometry
            self.model = load_checkpoint(ckpt, self.device)
        else:  # kernel and positions interpolated to this stage's grid
            self.model = move_to_stage(self.model, stage, self.cfg).to(self.device)
        self.loader = self._setup_loader(self.cfg.data, stage)
        self.stage_first_epoch = self.state.epoch
        if ckpt is not None:
            self.stage_first_epoch = int(self.state.loader.get("stage_first_epoch", self.state.epoch))
            if self.state.loader:
                self.loader.load_state_dict(self.state.loader)
        self.steps_per_epoch = self.cfg.optim.steps_per_epoch or self._epoch_steps(self.stage_first_epoch)
        first, per_epoch = self.stage_first_epoch, self.cfg.optim.steps_per_epoch
        self.total_steps = stage_steps(stage.steps, stage.epochs, self._epoch_steps, first, per_epoch)
        self.ddp_model = self.ranks.wrap(self.model, self.cfg.run.find_unused)
        if self.cfg.run.compile:  # the encoder blocks only: see model.step.compile_model
            step_io.compile_model(self.model)
        self.compiled = self.ddp_model
        self._setup_optimizer(self.cfg.optim, ckpt)

    # ---- the loop -------------------------------------------------------------------------------

    def train(self, stop_after: int | None = None) -> dict:
        """Run every stage to its end (or stop after ``stop_after`` more steps: a simulated kill)."""
        done_now = 0
        while self.state.stage < len(self.stages):
            stage = self.stages[self.state.stage]
            estimate = stage.steps <= 0 and (self.cfg.optim.steps_per_epoch or self.cfg.optim.grad_accum_tokens)
            desc = f"{stage.name} (~{self.total_steps} steps, estimated)" if estimate else stage.name
            self.log.start_stage(desc, self.total_steps, self.state.stage_step)
            micro_steps = self._micro_steps()
            steps_left = self.state.stage_step < self.total_steps  # False: resumed from the stage's last step
            while self.state.stage_step < self.total_steps:
                info = self._update(micro_steps, stage)
                if not info:  # the loader's epoch ended before this step began
                    self._end_epoch(stage)
                    continue
                self._after_step(info, stage)
                done_now += 1
                if stop_after is not None and done_now >= stop_after:
                    self.log.end_stage()
                    return {"stopped_at": self.state.step}
            if steps_left:
                # epoch-driven stages end exactly at an epoch's end, on every rank's loader (model.step)
                if self.reducer.sum(self.loader.at_epoch_end())[0] == self.ranks.world:
                    self._end_epoch(stage)
                self.state.loader = self._loader_state()
            self._end_stage(stage)
        return self._finish()

    def _micro_steps(self):
        """The loader's micro-steps, epoch after epoch; ``None`` from an epoch's end until it is closed."""
        while True:
            epoch = self.state.epoch
            self.loader.set_epoch(epoch)
            yield from self.loader
            while self.state.epoch == epoch:
                yield None

    def _after_step(self, info: dict, stage: Stage) -> None:
        """Count the step, log it, evaluate and checkpoint when their intervals say so."""
        run = self.cfg.run
        self.state.stage_step += 1
        self.state.step += 1
        info.update(step=self.state.step, stage=stage.name, epoch=self.state.epoch)
        info["tokens_per_s"] = info["tokens"] / max(info.pop("seconds"), 1e-9)
        self.log.step(info)
        if self.state.step % max(1, run.log_every) == 0 or self.state.stage_step == 1:
            self.log.write(info)
        self.history.append(info)
        if self.cfg.eval.every and self.state.step % self.cfg.eval.every == 0:
            self.last_metrics = self._evaluate(stage) or self.last_metrics
        self.state.loader = self._loader_state()
        if run.ckpt_every and self.state.step % run.ckpt_every == 0:
            self.save_checkpoint()

    def _loader_state(self) -> dict:
        return {**self.loader.state_dict(), "stage_first_epoch": self.stage_first_epoch}

    def _end_epoch(self, stage: Stage) -> None:
        self.state.epoch += 1
        self.state.loader = self._loader_state()
        self._save_weights(self.run.epoch(self.state.epoch))
        if not self.cfg.eval.every:
            self._evaluate(stage)

    def _end_stage(self, stage: Stage) -> None:
        """Evaluate (unless just done), save ``stageN/``, and move the weights into the next stage's geometry."""
        self.log.end_stage()
        self.last_metrics = self._evaluate(stage) or self.last_metrics  # (done already at this step: its metrics)
        self._save_weights(self.run.stage(self.state.stage))
        self.state.stage += 1
        if self.state.stage < len(self.stages):
            self.state.stage_step = 0
            self.state.loader = {}
            self._start_stage(self.state.stage, None)

    # ---- one update -----------------------------------------------------------------------------

    def _loss(self, batch, stage: Stage) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss over the micro-step's clips (with the KD term in a KD stage), and the ``(N, C)`` logits."""
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        padded = bool(self.cfg.data.loader.target_frames)
        with autocast:
            logits = self.compiled(model_input(batch, padded))
            teacher = self.teacher if stage.kd else None
            return train_loss(logits, batch, self.cfg, teacher, padded), logits

    def _update(self, batches, stage: Stage) -> dict:
        """One optimizer step from ``batches`` (:class:`model.step.StepRunner`); ``{}`` when every rank's
        loader is exhausted before the step's first micro-step (the epoch is over)."""
        lr = optim_lr(self.cfg.optim, self.state.stage_step, self.total_steps, self.steps_per_epoch)
        return self.stepper.step(batches, lambda b: self._loss(b, stage), self.device, self.state.step + 1, lr)

    def _evaluate(self, stage: Stage, split: str = "valid") -> dict:
        """Held-out metrics of the model's weights now (main rank), logged as a ``split`` row.

        The training weights (``valid``) are evaluated once per step; other weights put into the model at the end
        (``valid_ema``, ``valid_averaged``) are always evaluated afresh.
        """
        if self.valid_data is None or not self.ranks.is_main:
            return {}
        if split == "valid" and self._last_eval[0] == self.state.step:
            return self._last_eval[1]
        metrics = evaluate_stage(self.model, self.valid_data, self.train_data, self.cfg, stage, self.device)
        self.log.write({"step": self.state.step, "stage": stage.name, "split": split, **metrics})
        if split == "valid":
            self._last_eval = (self.state.step, metrics)
        return metrics

    # ---- checkpoints ----------------------------------------------------------------------------

    def _save_weights(self, folder: Path) -> None:
        if self.ranks.is_main:
            self.run.save_weights(folder, self.model, self.cfg, labels_info(self.train_data, self.cfg.data.loader))

    def save_checkpoint(self) -> Path | None:
        """Atomic full-state checkpoint ``checkpoints/step_XXXXXXXX`` (model, optimizer, loader, RNG, step, stage)."""
        self.state.flops, self.state.tokens = self.stepper.flops, self.stepper.tokens
        path = None
        if self.ranks.is_main:
            extra = {"optimizer": self.optimizer.state_dict()}
            if self.ema is not None:
                extra["ema"] = self.ema.state_dict()
            labels, keep = labels_info(self.train_data, self.cfg.data.loader), self.cfg.run.keep_last
            path = self.run.save_step(self.state, self.model, self.cfg, labels, extra, self.device, keep)
        self.ranks.barrier()
        return path

    def _finish(self) -> dict:
        """``final/`` (and ``ema/``, ``averaged/``), their held-out metrics, ``report.md`` and ``result.json``."""
        wall = time.perf_counter() - self.wall_start
        result = {"steps": self.state.step, "wall_s": wall, "flops": self.stepper.flops, "valid": self.last_metrics}
        if not self.ranks.is_main:
            return result
        self._save_weights(self.run.final)
        if self.ema is not None:
            self.ema.copy_to(self.model)
            self._save_weights(self.run.ema)
            result["valid_ema"] = self._evaluate(self.stages[-1], "valid_ema")
        paths = self.run.epochs(*self.cfg.optim.average) if self.cfg.optim.average else []
        if paths:
            average_checkpoints(self.model, paths)
            self._save_weights(self.run.averaged)
            result["valid_averaged"] = self._evaluate(self.stages[-1], "valid_averaged")
        write_train_report(self.run.report, self.cfg, result, self.history)
        self.run.write_result(result)
        return result

    def cleanup(self) -> None:
        torch.set_num_threads(self._threads_before)
        self.log.close()
        self.ranks.close()


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
