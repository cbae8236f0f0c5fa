"""Which engine computes a model version on the CPU (:mod:`deepvit.artifact.engines`): among the candidates
that this host offers and the artifact's gates allow, the operator's setting, and what was chosen and why,
as the load log, ``GET /models`` and ``deepvit_model_info`` report it. The measurement itself is the warm-up's
(:mod:`.models.manager`): every candidate is warmed and the fewest milliseconds per image serves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from deepvit.artifact.engines import CPU_ENGINE, ENGINES, Candidates, Engine

from .config import Settings

ChosenBy = Literal["setting", "measurement", "only one", "default", "fallback", "gpu"]


class EngineRequiredError(Exception):
    """DEEPVIT_REQUIRE_ENGINE: the engine set is not available here, or the artifact's gate refuses it."""


@dataclass(frozen=True)
class EngineChoice:
    """What computes a version, and why: the report of the load log, ``GET /models`` and the metrics."""

    engine: Engine
    precision: str  # what it computes in
    chosen_by: ChosenBy
    reason: str
    images_per_s: dict[str, float] = field(default_factory=dict)  # measured in the warm-up, by engine
    refused: dict[str, str] = field(default_factory=dict)  # engines not used, and why

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.engine.name,
            "provider": self.engine.provider,
            "precision": self.precision,
            "chosen_by": self.chosen_by,
            "reason": self.reason,
            "warmup_images_per_s": {k: round(v, 2) for k, v in self.images_per_s.items()},
            "not_used": self.refused,
        }

    def describe(self) -> str:
        measured = ", ".join(f"{k} {v:.1f}" for k, v in self.images_per_s.items())
        refused = "; ".join(f"{k}: {v}" for k, v in self.refused.items())
        return (
            f"engine {self.engine.name} ({self.precision}), chosen by {self.chosen_by}: {self.reason}"
            + (
                f"; images/s in the warm-up, each engine at its best instances and batch: {measured}"
                if measured
                else ""
            )
            + (f"; not used: {refused}" if refused else "")
        )


def fixed_engine(settings: Settings, found: Candidates) -> tuple[Engine | None, str]:
    """The operator's engine (None: auto), or today's CPU provider where the host or the gate refuses it;
    with DEEPVIT_REQUIRE_ENGINE that refusal is fatal. Returns the engine and why."""
    if settings.engine == "auto":
        return None, ""
    wanted = ENGINES[settings.engine]
    if wanted in found.engines:
        return wanted, "DEEPVIT_ENGINE"
    why = found.refused.get(wanted.name, "not offered here")
    msg = f"DEEPVIT_ENGINE={wanted.name} cannot compute this artifact here: {why}"
    if settings.require_engine:
        raise EngineRequiredError(msg + "; DEEPVIT_REQUIRE_ENGINE=true makes this fatal")
    return CPU_ENGINE, msg + "; falling back to cpu"
