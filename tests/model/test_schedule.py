"""A phase's step count and lr come from pure functions of the config and the loader's epoch plans."""

from __future__ import annotations

import math

from flexast.model.config import from_dict
from flexast.model.schedule import lr_at, optim_lr, phase_steps


def test_phase_steps_count_whole_and_partial_epochs_from_the_plans():
    plans = {3: 10, 4: 7, 5: 9}  # steps each planned epoch holds (epochs differ: shuffles and packing)
    asked = []

    def epoch_steps(epoch):
        asked.append(epoch)
        return plans[epoch]

    assert phase_steps(0, 2.5, epoch_steps, first_epoch=3) == 10 + 7 + math.ceil(0.5 * 9)
    assert asked == [3, 4, 5]
    assert phase_steps(12, 2.5, epoch_steps, first_epoch=3) == 12  # steps win over epochs
    assert phase_steps(0, 1.5, epoch_steps, first_epoch=3, steps_per_epoch=4) == 6  # a set epoch length wins
    assert phase_steps(0, 0.01, epoch_steps, first_epoch=3) == 1  # never an empty phase


def test_optim_lr_is_lr_at_with_the_section_and_a_warmup_inside_the_phase():
    o = from_dict({"optim": {"lr": 1e-3, "warmup_steps": 50, "schedule": "cosine", "min_lr": 1e-5}}).optim
    for step in (0, 3, 9):
        want = lr_at(step, base_lr=1e-3, warmup_steps=9, schedule="cosine", total_steps=10, min_lr=1e-5)
        assert optim_lr(o, step, total_steps=10, steps_per_epoch=5) == want
