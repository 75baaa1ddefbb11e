"""DomainBed-style hyperparameter draws: run 0 takes defaults, every other run samples each name
from its own seeded generator, so adding a hyperparameter never changes the others' draws.

Pure standard library: the planner resolves draws with it and writes them into job descriptions.
"""
from __future__ import annotations

import hashlib
import random
from typing import Mapping, Sequence


def _generator(seed: int, run: int, name: str) -> random.Random:
    # One generator per (seed, run, name), derived by hashing so it is stable across processes
    # and Python versions (hash() of str is salted per process; sha256 is not).
    digest = hashlib.sha256(f"{seed}:{run}:{name}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def draw(seed: int, run: int, name: str, default: str, choices: Sequence[str]) -> str:
    """The value of hyperparameter `name` for target run `run` (strings, as in the API)."""
    if run == 0 or not choices:
        return default
    return _generator(seed, run, name).choice(list(choices))


def draw_all(seed: int, run: int, table: Mapping[str, tuple[str, Sequence[str]]]) -> dict[str, str]:
    """Resolve every hyperparameter of `table` ({name: (default, choices)}) for one run."""
    return {name: draw(seed, run, name, default, choices) for name, (default, choices) in sorted(table.items())}


DEFAULT_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    # docs/algorithm.md: lr {1e-5, 3e-5, 5e-5}, weight decay {1e-4, 1e-6}, dropout {0, 0.1, 0.5}; defaults 5e-5, 0, 0.
    "lr": ("5e-5", ("1e-5", "3e-5", "5e-5")),
    "weightDecay": ("0", ("1e-4", "1e-6")),
    "dropout": ("0", ("0", "0.1", "0.5")),
}
