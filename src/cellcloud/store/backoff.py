"""Client-side overload habits: capped exponential backoff with full jitter, and a token-bucket
retry budget so retries cannot multiply load when the store is struggling."""

from __future__ import annotations

import random
from dataclasses import dataclass


def full_jitter_ms(rng: random.Random, attempt: int, base_ms: int = 5, cap_ms: int = 500) -> int:
    """AWS's "full jitter": uniform over [0, min(cap, base * 2^attempt)]."""
    return rng.randint(0, min(cap_ms, base_ms * 2 ** min(attempt, 20)))


@dataclass
class RetryBudget:
    """Each first attempt earns ``ratio`` tokens, each retry spends one; at most
    ``tokens_max`` banked. Time-free: the budget scales with successful traffic."""

    ratio: float = 0.2
    tokens_max: float = 20.0
    tokens: float = 10.0

    def on_attempt(self) -> None:
        self.tokens = min(self.tokens_max, self.tokens + self.ratio)

    def try_spend(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
