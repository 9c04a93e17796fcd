"""What the clipping study runs: strategies × learning rates × seeds on one step budget, and the config of
each run (the user's config with only the compared knobs changed, so every run sees the same tiles, model,
augmentation and thresholds)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, get_args

from pipeline.config import ClipConfig, Config, config_from_dict
from pipeline.errors import SatdetError

ALL_STRATEGIES: tuple[str, ...] = get_args(ClipConfig.model_fields["strategy"].annotation)

# The study's defaults, in one place: StudyPlan, `satdet experiment clipping` and the Prefect flow read them.
# The seven strategies compared by default (`norm`, per-tensor clipping, can be asked for explicitly).
STRATEGIES: tuple[str, ...] = ("none", "global_norm", "value", "loss_adaptive", "autoclip", "agc", "zclip")
LRS: tuple[float, ...] = (0.02, 0.2)  # a normal and a high peak learning rate
SEEDS: tuple[int, ...] = (0,)
STEPS = 80  # optimizer steps per run
TARGET_FRACTION = 0.5  # target loss = this × the initial loss

# The threshold options each strategy reads (shown in the report next to its results).
THRESHOLD_KEYS: dict[str, tuple[str, ...]] = {
    "none": (),
    "global_norm": ("clip_norm",),
    "norm": ("clip_norm",),
    "value": ("clip_value",),
    "loss_adaptive": ("base", "slope", "cap", "inverse"),
    "autoclip": ("percentile", "history", "warmup_steps"),
    "agc": ("agc_lambda", "agc_eps"),
    "zclip": ("z_threshold", "ema_alpha", "warmup_steps"),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    strategy: str
    lr: float
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.strategy}-lr{self.lr:g}-s{self.seed}"


@dataclass(frozen=True)
class StudyPlan:
    """The grid and the shared budget.

    `warmup_fraction` caps the LR warmup, and the autoclip/zclip statistics warmup, at that share of
    `steps` (a production LR warmup of 150 steps would never reach the peak LR in an 80-step study, and a
    25-step zclip warmup would leave it unclipped through the riskiest early steps).
    `max_consecutive_skips` stops a run after that many non-finite steps in a row (it has diverged; the rest
    of its budget is not spent).
    """

    strategies: tuple[str, ...] = STRATEGIES
    lrs: tuple[float, ...] = LRS
    seeds: tuple[int, ...] = SEEDS
    steps: int = STEPS
    target_fraction: float = TARGET_FRACTION
    target_loss: float | None = None
    window: int = 5
    final_window: int = 10
    warmup_fraction: float = 0.1
    max_consecutive_skips: int = 10
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into the report

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in ALL_STRATEGIES]
        if unknown:
            raise SatdetError(f"unknown clipping strategy {unknown[0]!r}; choose from {', '.join(ALL_STRATEGIES)}")
        if not self.strategies or not self.lrs or not self.seeds:
            raise SatdetError("the study needs at least one strategy, one learning rate and one seed")
        if len(set(self.strategies)) != len(self.strategies) or len(set(self.lrs)) != len(self.lrs):
            raise SatdetError("strategies and learning rates must not repeat")
        if any(lr <= 0 for lr in self.lrs):
            raise SatdetError(f"learning rates must be > 0, got {list(self.lrs)}")
        if self.steps < 2 * self.window:
            raise SatdetError(f"--steps {self.steps}: the study needs at least {2 * self.window} steps")
        if not 0 < self.target_fraction < 1:
            raise SatdetError(f"target fraction {self.target_fraction}: must be between 0 and 1")

    def runs(self) -> list[RunSpec]:
        """Every run, seed-major then learning rate then strategy (a partial study compares like with like)."""
        return [RunSpec(s, lr, seed) for seed in self.seeds for lr in self.lrs for s in self.strategies]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_config(config: Config, plan: StudyPlan, spec: RunSpec) -> Config:
    """The config of one run: `config` with the strategy, learning rate, seed and budget of `spec`.

    Thresholds come from the user's `train.clip` block unchanged. Telemetry is logged every step, there
    is no periodic validation or early stopping (one final validation instead), no time budget, and one
    checkpoint at the end.
    """
    data = config.model_dump(mode="json")
    tr = data["train"]
    warmup = tr["schedule"]["warmup_steps"]
    tr["schedule"]["warmup_steps"] = min(warmup, max(1, round(plan.warmup_fraction * plan.steps))) if warmup else 0
    clip_warmup = tr["clip"]["warmup_steps"]  # autoclip/zclip statistics: capped the same way
    tr["clip"]["warmup_steps"] = min(clip_warmup, max(1, round(plan.warmup_fraction * plan.steps)))
    tr["clip"]["strategy"] = spec.strategy
    tr["optimizer"]["learning_rate"] = spec.lr
    tr.update(
        steps=plan.steps,
        log_every=1,
        eval_every=0,
        early_stopping_patience=0,
        checkpoint_every=plan.steps,
        keep_checkpoints=1,
        time_budget_minutes=None,
        max_consecutive_skips=plan.max_consecutive_skips,
    )
    data["seed"] = spec.seed
    data["data"]["seed"] = spec.seed
    data["model"]["seed"] = spec.seed
    return config_from_dict(data, f"study run {spec.run_id}")


def thresholds(config: Config, strategy: str) -> str:
    """The threshold settings a strategy uses, e.g. 'clip_norm=10' (empty for none)."""
    clip = config.train.clip
    return " ".join(f"{k}={getattr(clip, k):g}" if isinstance(getattr(clip, k), float) else f"{k}={getattr(clip, k)}"
                    for k in THRESHOLD_KEYS.get(strategy, ()))


def config_digest(config: Config) -> str:
    """Content hash of everything that shapes a run (not its name or output folder)."""
    data = config.model_dump(mode="json")
    data.pop("name", None)
    data.pop("runs_dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
