"""``model train``: one recipe loop for every recipe (``setup`` → ``train`` → ``save_checkpoint`` → ``cleanup``).

Notation: ``N`` clips of a micro-step, ``C`` classes, ``L`` tokens of a micro-step. A *step* is one
optimizer update; it may accumulate several micro-steps until ``optim.grad_accum_tokens`` tokens (counted
over all ranks) have been seen. A run is a list of *phases* (:mod:`model.recipes`: one for ast, flexiast and
elasticast, one per coarse-to-fine phase); ``phase_step`` restarts at 0 in every phase (the lr schedule is a
pure function of it, :func:`model.schedule.lr_at`).

Where things live: ranks and devices in :mod:`model.distributed`, the optimizer step (micro-steps, ranks out of
data, gradient averaging) in :mod:`model.step`, the loss in :mod:`model.losses`, held-out metrics in
:mod:`model.evaluate`, the run folder in :mod:`model.run_dir`, logging in :mod:`model.metric_log`, the model of
each phase in :mod:`model.recipes`, a phase's length in steps in :mod:`model.schedule`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from flexast.model import step as step_io
from flexast.model.averaging import EMA, average_checkpoints
from flexast.model.checkpoint import load_checkpoint
from flexast.model.config import Config, DataConfig, ModelSection, OptimConfig
from flexast.model.data import check_sources, labels_info, open_data, shifts_of, stream_config
from flexast.model.distributed import Ranks
from flexast.model.evaluate import evaluate_phase
from flexast.model.losses import batch_loss
from flexast.model.metric_log import MetricLog
from flexast.model.recipes import Phase, build_model, move_to_phase, plan_phases
from flexast.model.report import write_train_report
from flexast.model.run_dir import RunDir, TrainState, load_train_state, restore_train_extra
from flexast.model.schedule import optim_lr, phase_length
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
        self.stepper: step_io.StepRunner | None = None  # the phase's optimizer steps (model.step)
        self.wall_start = time.perf_counter()
        self.history: list[dict] = []
        self.last_metrics: dict = {}
        self._last_eval: tuple[int, dict] = (-1, {})  # (step, metrics) of the training weights' last evaluation
        self._threads_before = torch.get_num_threads()

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Ranks, data, model, run folder; then the first phase (or the checkpoint's, with ``resume``)."""
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
        self._start_phase(self.state.phase, ckpt)
        if self.ranks.is_main:
            self.log = MetricLog(
                self.run.metrics, self.run.tensorboard if cfg.run.tensorboard else None, cfg.run.progress
            )

    def _setup_data(self, d: DataConfig) -> None:
        """The training and held-out sources, checked before any step, and the recipe's phases."""
        if self.train_data is None:
            self.train_data = open_data(d.train, "data.train", d.source)
        if self.valid_data is None and d.valid:
            self.valid_data = open_data(d.valid, "data.valid", "memory", self.cfg.eval.max_clips)
        check_sources(self.train_data, self.valid_data, d.loader)
        self.vocab = self.train_data.label_names
        self.labels = labels_info(self.train_data, d.loader)  # labels.json of every weights folder
        self.phases = plan_phases(self.cfg, shifts_of(self.train_data))

    def _setup_model(self, m: ModelSection) -> None:
        """A fresh model (initialised from ``model.init`` when given) and the frozen KD teacher, if any."""
        n_mels = int(self.train_data.index.get("n_mels", m.n_mels))
        self.model = build_model(self.cfg, len(self.vocab), n_mels).to(self.device)
        self.teacher = None
        if self.cfg.recipe.kd.teacher:
            self.teacher = load_checkpoint(self.cfg.recipe.kd.teacher, self.device)
            self.teacher.eval().requires_grad_(False)

    def _setup_loader(self, d: DataConfig, phase: Phase):
        """The phase's loader over the training source (one loader for every source and recipe)."""
        m = self.cfg.model
        stride = (m.fstride or phase.patches[0][0], m.tstride or phase.patches[0][1])
        opts = stream_config(self.cfg, phase, self.cfg.run.seed + 1000 * self.state.phase, stride)
        return make_loader(opts, self.train_data, rank=self.ranks.rank, world_size=self.ranks.world)

    def _setup_optimizer(self, o: OptimConfig, ckpt: Path | None) -> None:
        """A fresh optimizer (and EMA) per phase, or the checkpoint's states (RNG included)."""
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

    def _start_phase(self, index: int, ckpt: Path | None) -> None:
        """Phase ``index``: the model at its geometry (or the checkpoint's), its loader and length, DDP, optimizer."""
        phase = self.phases[index]
        self.state.phase = index
        if ckpt is not None:  # the checkpoint's model config carries the phase's geometry
            self.model = load_checkpoint(ckpt, self.device)
        else:  # kernel and positions interpolated to this phase's grid
            self.model = move_to_phase(self.model, phase, self.cfg).to(self.device)
        self.loader = self._setup_loader(self.cfg.data, phase)
        self.phase_first_epoch = int(self.state.loader.get("phase_first_epoch", self.state.epoch))
        if ckpt is not None and self.state.loader:
            self.loader.load_state_dict(self.state.loader)
        budget, world = self.cfg.data.loader.budget_tokens, self.ranks.world
        length = phase_length(phase, self.cfg.optim, self.loader, budget, world, self.phase_first_epoch)
        self.total_steps, self.steps_per_epoch = length
        self.ddp_model = self.ranks.wrap(self.model, self.cfg.run.find_unused)
        if self.cfg.run.compile:  # the encoder blocks only: see model.step.compile_model
            step_io.compile_model(self.model)
        self._setup_optimizer(self.cfg.optim, ckpt)

    # ---- the loop -------------------------------------------------------------------------------

    def train(self, stop_after: int | None = None) -> dict:
        """Run every phase to its end (or stop after ``stop_after`` more steps: a simulated kill)."""
        done_now, first = 0, self.state.phase
        for index in range(first, len(self.phases)):
            if index > first:
                self._start_phase(index, None)
            phase = self.phases[index]
            estimated = phase.steps <= 0 and bool(self.cfg.optim.steps_per_epoch or self.cfg.optim.grad_accum_tokens)
            self.log.start_phase(phase.name, self.total_steps, self.state.phase_step, estimated)
            for info in self._steps(phase):
                self._after_step(info, phase)
                done_now += 1
                if stop_after is not None and done_now >= stop_after:
                    self.log.end_phase()
                    return {"stopped_at": self.state.step}
            self._end_phase(phase)
        return self._finish()

    def _steps(self, phase: Phase):
        """The phase's remaining optimizer steps (their infos); epochs that end on the way are closed."""
        resumed_at_end = self.state.phase_step >= self.total_steps  # killed after the phase's last step
        micro_steps = self._micro_steps()
        while self.state.phase_step < self.total_steps:
            info = self._update(micro_steps, phase)
            if info:
                yield info
            else:  # the loader's epoch ended before this step began
                self._end_epoch(phase)
        # epoch-driven phases end exactly at an epoch's end, on every rank's loader (model.step)
        if not resumed_at_end and self.reducer.sum(self.loader.at_epoch_end())[0] == self.ranks.world:
            self._end_epoch(phase)

    def _micro_steps(self):
        """The loader's micro-steps, epoch after epoch; ``None`` from an epoch's end until it is closed."""
        while True:
            epoch = self.state.epoch
            self.loader.set_epoch(epoch)
            yield from self.loader
            while self.state.epoch == epoch:
                yield None

    def _update(self, batches, phase: Phase) -> dict:
        """One optimizer step from ``batches`` (:class:`model.step.StepRunner`); ``{}`` when every rank's
        loader is exhausted before the step's first micro-step (the epoch is over)."""
        lr = optim_lr(self.cfg.optim, self.state.phase_step, self.total_steps, self.steps_per_epoch)
        return self.stepper.step(batches, lambda b: self._loss(b, phase), self.device, self.state.step + 1, lr)

    def _loss(self, batch, phase: Phase):
        """``(loss, (N, C) logits)`` of a micro-step (:func:`model.losses.batch_loss`; KD in a KD phase)."""
        return batch_loss(self.ddp_model, batch, self.cfg, self.teacher if phase.kd else None, self.device)

    def _after_step(self, info: dict, phase: Phase) -> None:
        """Count the step, log it, evaluate and checkpoint when their intervals say so."""
        run, state = self.cfg.run, self.state
        state.phase_step += 1
        state.step += 1
        info.update(step=state.step, phase=phase.name, epoch=state.epoch)
        info["tokens_per_s"] = info["tokens"] / max(info.pop("seconds"), 1e-9)
        self.log.step(info)
        if state.step % max(1, run.log_every) == 0 or state.phase_step == 1:
            self.log.write(info)
        self.history.append(info)
        if self.cfg.eval.every and state.step % self.cfg.eval.every == 0:
            self.last_metrics = self._evaluate(phase) or self.last_metrics
        state.loader = self._loader_state()
        if run.ckpt_every and state.step % run.ckpt_every == 0:
            self.save_checkpoint()

    def _loader_state(self) -> dict:
        return {**self.loader.state_dict(), "phase_first_epoch": self.phase_first_epoch}

    def _end_epoch(self, phase: Phase) -> None:
        self.state.epoch += 1
        self.state.loader = self._loader_state()
        self._save_weights(self.run.epoch(self.state.epoch))
        if not self.cfg.eval.every:
            self._evaluate(phase)

    def _end_phase(self, phase: Phase) -> None:
        """Evaluate (unless just done) and save ``phaseN/``; the next phase starts at its step 0."""
        self.log.end_phase()
        self.state.loader = self._loader_state()
        self.last_metrics = self._evaluate(phase) or self.last_metrics  # (done already at this step: its metrics)
        self._save_weights(self.run.phase(self.state.phase))
        self.state.phase_step, self.state.loader = 0, {}

    def _evaluate(self, phase: Phase, split: str = "valid") -> dict:
        """Held-out metrics of the model's weights now (main rank), logged as a ``split`` row.

        The training weights (``valid``) are evaluated once per step; other weights put into the model at the end
        (``valid_ema``, ``valid_averaged``) are always evaluated afresh.
        """
        if self.valid_data is None or not self.ranks.is_main:
            return {}
        if split == "valid" and self._last_eval[0] == self.state.step:
            return self._last_eval[1]
        metrics = evaluate_phase(self.model, self.valid_data, self.train_data, self.cfg, phase, self.device)
        self.log.write({"step": self.state.step, "phase": phase.name, "split": split, **metrics})
        if split == "valid":
            self._last_eval = (self.state.step, metrics)
        return metrics

    # ---- checkpoints ----------------------------------------------------------------------------

    def _save_weights(self, folder: Path) -> None:
        if self.ranks.is_main:
            self.run.save_weights(folder, self.model, self.cfg, self.labels)

    def save_checkpoint(self) -> Path | None:
        """Atomic full-state checkpoint ``checkpoints/step_XXXXXXXX`` (model, optimizer, loader, RNG, step, phase)."""
        self.state.flops, self.state.tokens = self.stepper.flops, self.stepper.tokens
        path = None
        if self.ranks.is_main:
            extra = {"optimizer": self.optimizer.state_dict()}
            if self.ema is not None:
                extra["ema"] = self.ema.state_dict()
            keep = self.cfg.run.keep_last
            path = self.run.save_step(self.state, self.model, self.cfg, self.labels, extra, self.device, keep)
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
            result["valid_ema"] = self._evaluate(self.phases[-1], "valid_ema")
        paths = self.run.epochs(*self.cfg.optim.average) if self.cfg.optim.average else []
        if paths:
            average_checkpoints(self.model, paths)
            self._save_weights(self.run.averaged)
            result["valid_averaged"] = self._evaluate(self.phases[-1], "valid_averaged")
        write_train_report(self.run.report, self.cfg, result, self.history)
        self.run.write_result(result)
        return result

    def cleanup(self) -> None:
        torch.set_num_threads(self._threads_before)
        self.log.close()
        self.ranks.close()


def train(cfg: Config, resume: bool = False, **data) -> dict:
    """Library entry point of ``model train``: set up, train every phase, write the report, clean up."""
    trainer = Trainer(cfg, resume=resume, **data)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()


def remove_run(out_dir: str | Path) -> None:
    """Delete a run folder (used by the demo to start clean)."""
    RunDir(out_dir).remove()
