"""The pieces of one optimizer step that touch devices and ranks: batch transfer, host-side collectives, gradient
synchronisation, and the non-finite guard.

Notation: ``N`` clips of a micro-step, ``L`` its tokens, ``R`` ranks (``world``).

Host↔device syncs. A micro-step reads nothing back from the device: token and clip counts come from the host
copy of the batch (the packer derived them on the CPU), the per-micro-step counts are summed over ranks on a
gloo (CPU) process group (skipped with one rank), the loss is accumulated on the device, and FLOPs are counted
from host token counts. The batch's features and labels go to the GPU from pinned memory with ``non_blocking``;
its small index tensors (token counts, offsets) stay on the host, so the model knows every clip's length without
asking the device. One read-back per *optimizer step* remains: the loss sum and the gradient norm, together,
which is also the non-finite check.

Ranks with unequal step counts. Every micro-step all ranks sum ``(tokens, clips, has_batch)``. A rank whose
loader is exhausted keeps taking part with ``has_batch = 0`` until every rank is out: the epoch ends on all ranks
at once, and no rank's data is dropped. Meanwhile it runs its previous batch with loss weight 0 (a zero
gradient), so that every rank runs every forward and backward DDP expects: DDP all-reduces in the backward of a
step's last micro-step, and rebuilds its buckets in a forward once. When the epoch ends before a step's last
micro-step, every micro-step ran under ``no_sync``: the accumulated gradients are then averaged by
:func:`all_reduce_gradients`, so the ranks never step on unsynchronised gradients.

Non-finite values. A loss or gradient norm that is NaN or infinite stops training with :class:`NonFiniteError`
naming the step and the clips whose logits (or, failing that, whose micro-step's loss) were not finite. There is
no loss scaler: bf16 autocast needs none. Were fp16 with a ``GradScaler`` added, its skipped steps (an overflow it
handles by lowering the scale) would be the one accepted exception.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flexast.model.errors import ModelError
from flexast.model.flops import train_flops
from flexast.pipeline.batch import PackedBatch


class NonFiniteError(ModelError, FloatingPointError):
    """The loss or the gradients of a step are NaN or infinite; the message names the step and the clips."""


# ------------------------------------------------------------------------------------------------ batches


def host_tokens(batch) -> int:
    """Tokens of a batch, from its host copy (never a device read)."""
    if isinstance(batch, PackedBatch):
        cu = batch.cu_seqlens
        if cu.device.type != "cpu":
            raise ModelError("host_tokens needs the host batch (cu_seqlens on the CPU); count before moving it")
        return int(cu[-1])
    return int(batch.total_tokens)


def to_device(batch, device: torch.device):
    """The batch with its features and labels on ``device`` (pinned, ``non_blocking`` for CUDA).

    A :class:`PackedBatch` keeps ``n_frames``, ``tokens``, ``cu_seqlens``, ``frame_shift_ms`` and ``rows`` on the
    host: the model copies ``cu_seqlens`` to the device itself and reads the lengths from the host copy.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return batch
    cuda = device.type == "cuda"

    def move(t: torch.Tensor) -> torch.Tensor:
        if cuda and not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=cuda)

    if isinstance(batch, PackedBatch):
        import copy

        out = copy.copy(batch)
        out.frames, out.labels = move(batch.frames), move(batch.labels)
        return out
    out = type(batch)(move(batch.x), move(batch.labels), batch.keys)
    out._tokens = batch.total_tokens
    return out


# ------------------------------------------------------------------------------------------------ ranks


class HostReducer:
    """Sums a few host numbers over ranks on a gloo group: no device sync, identity with one rank."""

    def __init__(self, world: int):
        self.world = world
        self.group = None
        if world > 1:
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def max(self, value: int) -> int:
        if self.world == 1:
            return int(value)
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t)


@torch.no_grad()
def all_reduce_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average every gradient over ranks in one flat all-reduce (what DDP's backward does), zeros for a rank
    that ran no backward this step. Every rank must call it with the same parameters."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# ------------------------------------------------------------------------------------------------ compile


def compile_model(model, **options) -> None:
    """``run.compile``: compile the encoder blocks of ``model`` (an :class:`~model.ast.ASTModel`), not the model.

    The parts around the blocks (patch embedding at the step's patch size, positions, token dropout, prefix
    tokens, pooling) read host lists and per-batch shapes; compiled, they made a graph per step. They stay eager,
    the blocks (nearly all FLOPs) compile once per backend and mode. Hitting the recompile limit raises instead of
    falling back to eager without a word.
    """
    import torch._dynamo

    torch._dynamo.config.fail_on_recompile_limit_hit = True
    model.encoder.compile_blocks(**options)


def compile_count() -> int:
    """Graphs dynamo has compiled in this process so far (first compiles and recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ------------------------------------------------------------------------------------------------ the guard


@dataclass
class MicroStep:
    """What is kept of a micro-step to name its clips if the step turns out non-finite (device tensors)."""

    keys: list[str]
    loss: torch.Tensor
    finite_logits: torch.Tensor  # (N,) bool


def micro_record(keys: list[str], loss: torch.Tensor, logits: torch.Tensor) -> MicroStep:
    return MicroStep(list(keys), loss.detach(), torch.isfinite(logits.detach()).all(1))


def grad_norm(params: list[torch.nn.Parameter], clip: float) -> torch.Tensor:
    """Total 2-norm of the gradients (a device scalar); clips them to ``clip`` when ``clip > 0``."""
    grads = [p.grad for p in params if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def read_step(step: int, loss_sum: torch.Tensor, gnorm: torch.Tensor, micro: list[MicroStep]) -> tuple[float, float]:
    """The step's loss sum and gradient norm as floats (the one read-back of a step); raise if either is not finite."""
    loss, norm = torch.stack([loss_sum.double().reshape(()), gnorm.double().reshape(()).to(loss_sum.device)]).tolist()
    if torch.isfinite(torch.tensor([loss, norm])).all():
        return loss, norm
    what = "loss" if not torch.isfinite(torch.tensor(loss)) else "gradient norm"
    bad = [k for m in micro for k, ok in zip(m.keys, m.finite_logits.tolist(), strict=True) if not ok]
    if bad:
        where = f"clips with non-finite logits: {_some(bad)}"
    else:
        bad_micro = [m for m in micro if not torch.isfinite(m.loss)]
        keys = [k for m in (bad_micro or micro) for k in m.keys]
        where = f"clips of the {'micro-step' if bad_micro else 'step'}: {_some(keys)}"
    value = loss if what == "loss" else norm
    raise NonFiniteError(
        f"step {step}: the {what} is {value} ({where}); training stopped. Check these clips' features "
        f"(pipeline verify) and optim.lr / optim.grad_clip"
    )


def _some(keys: list[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# ------------------------------------------------------------------------------------------------ the step


class StepRunner:
    """One optimizer step of a phase: micro-steps from the loader until ``accum_tokens`` tokens (summed over
    ranks; ``0``: one micro-step), the gradients averaged over the step's clips, clipped, then the update.

    Holds the run's FLOP and token totals and the last batch this rank trained on (its *shadow*: what it runs
    with weight 0 while other ranks still have data, see the module's notes). One runner per phase.
    """

    def __init__(self, model, ddp_model, optimizer, ema, reducer: HostReducer, optim, loader, *, flops=0.0, tokens=0):
        """``ddp_model``: ``model`` as the ranks run it; ``ema``: an :class:`~model.averaging.EMA` or ``None``;
        ``optim``: the run's ``OptimConfig`` (``grad_accum_tokens``, ``grad_clip``); ``loader``: the loader's
        ``StreamConfig`` (``budget_tokens``, ``target_frames``); ``flops`` / ``tokens``: the run's totals so far."""
        self.model, self.ddp_model, self.optimizer, self.ema, self.reducer = model, ddp_model, optimizer, ema, reducer
        self.accum_tokens, self.grad_clip = optim.grad_accum_tokens, optim.grad_clip
        self.budget_tokens, self.padded = loader.budget_tokens, bool(loader.target_frames)
        self.flops, self.tokens = flops, tokens
        self.shadow = None

    def step(self, batches: Iterator, loss_fn: Callable, device: torch.device, step: int, lr: float) -> dict:
        """Step number ``step`` at learning rate ``lr``; ``loss_fn(batch) -> (loss, (N, C) logits)``.

        Returns the step's ``loss`` (mean over this rank's clips), ``tokens`` (all ranks), ``fill``, ``lr`` and
        ``seconds``; ``{}`` when every rank's loader is exhausted before the step's first micro-step.
        """
        t0 = time.perf_counter()
        self.ddp_model.train()
        world = self.reducer.world
        acc_tokens = acc_clips = 0.0
        loss_sum = torch.zeros((), device=device)
        local_clips, fill, micro = 0, [], []
        n_micro, ddp_synced = 0, False
        while True:
            batch = next(batches, None)
            tokens = 0 if batch is None else host_tokens(batch)
            clips = 0 if batch is None else batch.n_clips
            # a rank out of data while others are not runs its previous batch with weight 0, so that every rank
            # runs every forward and backward DDP expects (its bucket rebuild, its all-reduces); a rank that never
            # had a batch skips, and then the step's gradients are averaged by hand
            run = batch if batch is not None else self.shadow
            g_tokens, g_clips, g_have, g_skip = self.reducer.sum(tokens, clips, batch is not None, run is None)
            if g_have == 0:  # every rank is out of data
                break
            last = acc_tokens + g_tokens >= self.accum_tokens
            ddp_synced = last and g_skip == 0
            if batch is not None:
                self.shadow = batch
                self.flops += float(train_flops(self.model.config, batch)) * world
                if not self.padded:
                    fill.append(tokens / (self.budget_tokens or tokens))
            if run is not None:
                sync = nullcontext() if ddp_synced or world == 1 else self.ddp_model.no_sync()
                with sync:
                    loss, logits = loss_fn(to_device(run, device))
                    (loss * clips).backward()
            if batch is not None:
                loss_sum += loss.detach() * clips
                micro.append(micro_record(batch.keys, loss, logits))
                local_clips += clips
            acc_tokens += g_tokens
            acc_clips += g_clips
            n_micro += 1
            if last:
                break
        if n_micro == 0:
            return {}
        params = [p for p in self.model.parameters() if p.requires_grad]
        if world > 1 and not ddp_synced:  # the epoch ended before the last micro-step, or a rank skipped it
            all_reduce_gradients(params, world)
        scale = world / max(1.0, acc_clips)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
        gnorm = grad_norm(params, self.grad_clip)
        loss_total, _ = read_step(step, loss_sum, gnorm, micro)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.tokens += int(acc_tokens)
        return {
            "loss": loss_total / max(1, local_clips),
            "tokens": int(acc_tokens),
            "fill": sum(fill) / len(fill) if fill else 1.0,
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }
