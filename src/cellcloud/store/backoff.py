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
    """Each first attempt earns ``earn_millitokens``; each retry spends 1000; at most
    ``millitokens_max`` banked. Integer arithmetic, time-free: the budget scales with traffic."""

    earn_millitokens: int = 200
    millitokens_max: int = 20_000
    millitokens: int = 10_000

    def on_attempt(self) -> None:
        self.millitokens = min(self.millitokens_max, self.millitokens + self.earn_millitokens)

    def try_spend(self) -> bool:
        if self.millitokens >= 1000:
            self.millitokens -= 1000
            return True
        return False
