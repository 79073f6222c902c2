"""Learning-rate schedules as one pure function of the optimizer step (nanoGPT's ``get_lr``).

``step`` counts optimizer updates from 0 within the current phase (coarse-to-fine resets it);
``steps_per_epoch`` converts it to a 0-based epoch for AST's step decay.
"""

from __future__ import annotations

import math

from flexast.pipeline.errors import ConfigError


def lr_at(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int = 0,
    schedule: str = "step",
    total_steps: int = 0,
    steps_per_epoch: int = 1,
    decay_start_epoch: int = 2,
    decay_every: int = 1,
    decay_factor: float = 0.5,
    min_lr: float = 0.0,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warm-up rises linearly from ``base_lr / warmup_steps`` to ``base_lr`` over the first
    ``warmup_steps`` steps. After it:

    - ``step`` (AST): ``base_lr · decay_factor ** k`` with ``k = (epoch − decay_start_epoch) // decay_every + 1``
      once ``epoch >= decay_start_epoch`` (AST AudioSet: halve every epoch from the 3rd, i.e. after the 2nd);
    - ``cosine``: from ``base_lr`` down to ``min_lr`` at ``total_steps``;
    - ``constant``: ``base_lr``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        if epoch < decay_start_epoch:
            return base_lr
        k = (epoch - decay_start_epoch) // max(1, decay_every) + 1
        return max(min_lr, base_lr * decay_factor**k)
    raise ConfigError(f"unknown lr schedule {schedule!r} (expected step, cosine or constant)")


def optim_lr(o, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """:func:`lr_at` with the ``optim`` section's settings (warm-up kept shorter than the phase)."""
    return lr_at(
        step,
        base_lr=o.lr,
        warmup_steps=min(o.warmup_steps, max(0, total_steps - 1)),
        schedule=o.schedule,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        decay_start_epoch=o.decay_start_epoch,
        decay_every=o.decay_every,
        decay_factor=o.decay_factor,
        min_lr=o.min_lr,
    )


def epoch_steps(loader_steps: int, accum_tokens: int, budget_tokens: int, world: int) -> int:
    """Optimizer steps of an epoch of ``loader_steps`` loader steps (equal on every rank): the same, or with
    ``optim.grad_accum_tokens`` (``accum_tokens``) an estimate from full budgets on ``world`` ranks."""
    if not accum_tokens:
        return loader_steps
    return max(1, math.ceil(loader_steps * world * budget_tokens / accum_tokens))


def phase_steps(steps: int, epochs: float, epoch_steps, first_epoch: int, steps_per_epoch: int = 0) -> int:
    """Optimizer steps of a phase: ``steps``, else ``epochs`` passes over the data counted exactly from
    ``epoch_steps(epoch)`` (the loader plans each epoch before it starts), so the count is the same whenever
    the run was interrupted; ``steps_per_epoch`` (``optim.steps_per_epoch``) overrides the count per epoch."""
    if steps > 0:
        return steps
    if steps_per_epoch:
        return max(1, math.ceil(epochs * steps_per_epoch))
    whole = int(epochs)
    total = sum(epoch_steps(first_epoch + e) for e in range(whole))
    if epochs > whole:
        total += math.ceil((epochs - whole) * epoch_steps(first_epoch + whole))
    return max(1, total)


def phase_length(phase, o, loader, budget_tokens: int, world: int, first_epoch: int) -> tuple[int, int]:
    """``(optimizer steps, steps per epoch)`` of ``phase`` (a :class:`model.recipes.Phase`) read by ``loader``
    from epoch ``first_epoch`` on, with the ``optim`` section ``o`` (see :func:`phase_steps`)."""

    def per_epoch(epoch: int) -> int:
        return epoch_steps(loader.steps_in_epoch(epoch), o.grad_accum_tokens, budget_tokens, world)

    total = phase_steps(phase.steps, phase.epochs, per_epoch, first_epoch, o.steps_per_epoch)
    return total, o.steps_per_epoch or per_epoch(first_epoch)
