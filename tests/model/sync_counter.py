"""Count the host↔device syncs a training step would make on a GPU, on the CPU.

``torch.cuda.set_sync_debug_mode`` exists only on CUDA. Here a :class:`torch.overrides.TorchFunctionMode` marks
the tensors that would live on the device and counts every read-back of one of them:

* device tensors: the model's parameters and their gradients, the batch tensors the trainer moves
  (``model.step.to_device``: features and labels), every tensor made with an explicit ``device=`` or moved with
  ``.to(device)``/``.cuda()``, and everything computed from any of these;
* read-backs (each a sync on a GPU): ``item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``,
  ``__index__``, ``numpy`` and ``cpu``;
* blocking copies to the device (on a GPU, a copy from pageable host memory waits for the stream): ``.to(device)``
  or ``.cuda()`` of a host tensor without ``non_blocking=True``, and ``torch.tensor``/``torch.as_tensor`` with a
  ``device=``. (``model.attention.host_to_device`` pins and copies ``non_blocking``.)

Host tensors (the packer's token counts and offsets, read on the CPU) are never counted, nor is anything inside
:meth:`SyncCounter.paused` (the optimizer's step: Adam keeps its step counts on the host unless ``capturable``
or ``fused``, so its ``item()`` calls are not syncs on a GPU either). The count is an upper
bound of the GPU's in one respect: ``.to(device)`` of a host tensor counts as making a device tensor even when the
device is the CPU, as on a GPU it would be.
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
}
MOVES = {torch.Tensor.to, torch.Tensor.cuda}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class SyncCounter(TorchFunctionMode):
    """``with SyncCounter(model) as c: ...``; ``c.count`` read-backs of device tensors, ``c.where`` their callers."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.device = WeakTensorKeyDictionary()
        self.count = 0
        self.off = False
        self.where: list[str] = []
        for p in model.parameters():
            self.device[p] = True

    def paused(self, fn):
        """``fn`` wrapped so that nothing it does is counted or marked."""

        def run(*args, **kwargs):
            self.off = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.off = False

        return run

    def mark(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self.device[t] = True

    def marking(self, move):
        """``move`` (:func:`model.step.to_device`) wrapped so that the batch it moves is marked as on the device."""

        def to_device(batch, device):
            out = move(batch, device)
            self.mark(out.labels, out.frames)
            return out

        return to_device

    def _is_device(self, t: torch.Tensor) -> bool:
        if t in self.device:
            return True
        return any(p.grad is t for p in self.model.parameters())

    @staticmethod
    def _caller() -> str:
        frame = [f for f in traceback.extract_stack()[:-2] if "flexast" in f.filename or "/model/" in f.filename]
        return f"{frame[-1].filename}:{frame[-1].lineno}" if frame else "?"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.off:
            return func(*args, **kwargs)
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        on_device = any(self._is_device(t) for t in inputs)
        if func in READS and on_device:
            self.count += 1
            self.where.append(f"{func.__name__} at {self._caller()}")
        out = func(*args, **kwargs)
        moved = func in MOVES and (
            any(isinstance(a, (torch.device, str)) for a in args[1:]) or "device" in kwargs or func is torch.Tensor.cuda
        )
        blocking = (moved and not on_device and kwargs.get("non_blocking") is not True) or (
            func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None
        )
        if blocking:
            self.count += 1
            self.where.append(f"blocking copy to the device ({func.__name__}) at {self._caller()}")
        if on_device or moved or kwargs.get("device") is not None:
            for t in _tensors(out):
                self.device[t] = True
        return out


class CountedBatches:
    """An iterator over batches that counts how many (micro-steps) were drawn from it."""

    def __init__(self, batches):
        self.src, self.drawn = iter(batches), 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.src)
        self.drawn += 1
        return batch
