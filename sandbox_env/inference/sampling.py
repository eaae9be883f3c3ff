"""How the engine picks tokens: the sampling settings of the local policy, the server and the
evaluation job. Stdlib only (the engine imports torch), so the jobs' config schemas can use it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingConfig:
    """How tokens are chosen. temperature 0 = greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    """per assistant step; the episode's max_total_tokens budget lowers it further"""

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
