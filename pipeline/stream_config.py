"""The stream's configuration: one dataclass, loaded from a dict or YAML, every bad key reported at once.

Units: frames are at the clip's own frame shift (``max_frames``, ``target_frames``), ``time_mask`` is
in 10 ms frames (scaled per clip by its compression), budgets are tokens
(:func:`pipeline.batch.token_count`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexast.pipeline.config_schema import check_known_keys
from flexast.pipeline.errors import ConfigError
from flexast.pipeline.resolution import ResolutionPolicy


@dataclass
class StreamConfig:
    """Options of :func:`pipeline.loader.make_loader`.

    Attributes:
        budget_tokens: tokens per step (flat mode), or rows × ``row_len`` (row mode).
        mode: ``"flat"`` (varlen attention) or ``"rows"`` (fixed rows of ``row_len`` tokens).
        row_len: tokens per row in row mode (ElasticAST: 2048).
        patches: patch sizes ``[p_f, p_t]``; with several, each training step draws one (FlexiAST).
            Evaluation uses the first.
        pack_buffer: clips the packer plans over (about 10× a step's clips).
        shuffle_buffer: samples in the shuffle buffer (training only).
        shuffle_shards: shuffle the shard order per (seed, epoch) (training only).
        train: training (shuffle, random crop, augmentation) or evaluation (none of them; every
            sample exactly once, in shard order up to packing).
        seed: the run's seed; with the epoch it fixes the whole order.
        resolution: a :class:`~pipeline.resolution.ResolutionPolicy` as a dict.
        max_frames: length cap (crop), or None for native length.
        target_frames: classic AST fixed length: crop or zero-pad every clip to it (before normalising).
        crop, eval_crop: crop window in training / evaluation: ``random``, ``center`` or ``start``.
        freq_mask, time_mask, n_freq_masks, n_time_masks: SpecAugment (training only).
        mixup_prob, mixup_alpha: mixup within a batch (training only); labels become soft.
        label_mode: ``multi_hot`` ((N, C) float, BCE) or ``index`` ((N,) int64, CE; one-hot float with mixup).
        n_classes: classes, default from ``index.json``.
        n_mels: mel bins, default from ``index.json``.
        norm_mean, norm_std: override the per-shift statistics of ``index.json`` with one pair.
        balanced: AST balanced sampling as stream reweighting (training only; needs the index).
        on_error: ``raise`` or ``skip`` (and count) on a corrupt, truncated or unreachable shard.
        retries, backoff_s: reopen attempts for transient errors and the first backoff (doubles).
        storage_options: fsspec options for remote shards (s3 endpoint, credentials, ...).
        num_workers: DataLoader worker processes per rank (0: in the main process).
        read_ahead_steps: steps whose reads a worker starts before it builds the current one, from a
            remote source (HTTP, S3); each worker then holds at most this many steps' fetched features
            beyond the one it builds. 0 reads each step when it is built. Local and in-memory sources
            read when built whatever this says (nothing to hide). Does not change the steps.
        stride: ``[s_f, s_t]`` overlapping patch strides of the classic padded AST input, used to count
            a step's tokens (None: non-overlapping patches).
    """

    budget_tokens: int = 4096
    mode: str = "flat"
    row_len: int | None = None
    patches: list = field(default_factory=lambda: [[16, 16]])
    pack_buffer: int = 128
    shuffle_buffer: int = 1000
    shuffle_shards: bool = True
    train: bool = True
    seed: int = 0
    resolution: dict = field(default_factory=lambda: {"kind": "fixed", "shift_ms": 10.0})
    max_frames: int | None = None
    target_frames: int | None = None
    crop: str = "random"
    eval_crop: str = "center"
    freq_mask: int = 0
    time_mask: int = 0
    n_freq_masks: int = 1
    n_time_masks: int = 1
    mixup_prob: float = 0.0
    mixup_alpha: float = 10.0
    label_mode: str = "multi_hot"
    n_classes: int | None = None
    n_mels: int | None = None
    norm_mean: float | None = None
    norm_std: float | None = None
    balanced: bool = False
    on_error: str = "raise"
    retries: int = 4
    backoff_s: float = 0.2
    storage_options: dict = field(default_factory=dict)
    num_workers: int = 0
    read_ahead_steps: int = 8
    stride: list | None = None

    def __post_init__(self) -> None:
        errors = []
        checks = {
            "mode": (self.mode, ("flat", "rows")),
            "crop": (self.crop, ("random", "center", "start")),
            "eval_crop": (self.eval_crop, ("random", "center", "start")),
            "label_mode": (self.label_mode, ("multi_hot", "index")),
            "on_error": (self.on_error, ("raise", "skip")),
        }
        errors += [f"{k}={v!r} (expected one of {allowed})" for k, (v, allowed) in checks.items() if v not in allowed]
        if not isinstance(self.read_ahead_steps, int) or self.read_ahead_steps < 0:
            errors.append(f"read_ahead_steps={self.read_ahead_steps!r} (must be an integer >= 0)")
        if self.budget_tokens <= 0:
            errors.append(f"budget_tokens={self.budget_tokens} (must be positive)")
        if self.mode == "rows" and (not self.row_len or self.budget_tokens % self.row_len):
            errors.append(f"row mode needs budget_tokens ({self.budget_tokens}) a multiple of row_len ({self.row_len})")
        if not self.patches or any(len(p) != 2 or min(p) <= 0 for p in self.patches):
            errors.append(f"patches={self.patches} (need [[p_f, p_t], ...] with positive sizes)")
        if (self.norm_mean is None) != (self.norm_std is None):
            errors.append("norm_mean and norm_std go together")
        if self.max_frames is not None and self.target_frames is not None:
            errors.append("max_frames and target_frames exclude each other")
        try:
            self.policy()
        except ConfigError as exc:
            errors.append(str(exc))
        if errors:
            raise ConfigError("bad stream config: " + "; ".join(errors))

    @classmethod
    def from_dict(cls, d: dict) -> StreamConfig:
        """Build from a dict, reporting every unknown key at once."""
        check_known_keys(cls, d, "stream config keys")
        return cls(**d)

    def policy(self) -> ResolutionPolicy:
        """The resolution policy (``resolution`` as a :class:`ResolutionPolicy`)."""
        try:
            return ResolutionPolicy(**self.resolution)
        except TypeError as exc:
            raise ConfigError(f"bad resolution policy {self.resolution}: {exc}") from exc

    def norm_stats(self, index: dict | None) -> dict:
        """``{shift_name: (mean, std)}``: the config's pair for every shift, else ``index.json``'s per-shift stats."""
        stats = (index or {}).get("stats", {})
        if self.norm_mean is not None:
            return _Const((float(self.norm_mean), float(self.norm_std)))
        if not stats:
            raise ConfigError("no normalisation statistics: give norm_mean/norm_std or an index.json with stats")
        return {k: (float(v["mean"]), float(v["std"])) for k, v in stats.items()}


class _Const(dict):
    """A mapping that gives the same (mean, std) for every shift name."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def __missing__(self, key):
        return self.value
