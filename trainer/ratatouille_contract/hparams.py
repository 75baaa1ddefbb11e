"""DomainBed-style hyperparameter draws: run 0 takes defaults, every other run samples each name
from its own seeded generator, so adding a hyperparameter never changes the others' draws.

Target runs draw from (seed, run, name). Auxiliary fine-tunings draw from their own stream
(``aux_stream``: the auxiliary's dataset), so the draws of fine-tuning k of one auxiliary depend
on that auxiliary, k and the pool's seed only: never on the target, nor on another auxiliary.

Pure standard library: the planner resolves draws with it and writes them into job descriptions.
"""
from __future__ import annotations

import hashlib
import random
from typing import Mapping, Sequence


def _generator(seed: int, run: int, name: str, stream: str = "") -> random.Random:
    # One generator per (stream, seed, run, name), derived by hashing so it is stable across
    # processes and Python versions (hash() of str is salted per process; sha256 is not). The
    # target runs' stream is "" and keeps the form it always had, so their draws never changed.
    text = f"{seed}:{run}:{name}" if not stream else f"{stream}|{seed}:{run}:{name}"
    digest = hashlib.sha256(text.encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def draw(seed: int, run: int, name: str, default: str, choices: Sequence[str], stream: str = "") -> str:
    """The value of hyperparameter `name` for run `run` of `stream` (strings, as in the API)."""
    if run == 0 or not choices:
        return default
    return _generator(seed, run, name, stream).choice(list(choices))


def draw_all(seed: int, run: int, table: Mapping[str, tuple[str, Sequence[str]]],
             stream: str = "") -> dict[str, str]:
    """Resolve every hyperparameter of `table` ({name: (default, choices)}) for one run."""
    return {name: draw(seed, run, name, default, choices, stream)
            for name, (default, choices) in sorted(table.items())}


def aux_stream(dataset: str) -> str:
    """The draw stream of the fine-tunings of the auxiliary on `dataset`."""
    return f"aux:{dataset}"


DEFAULT_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    # docs/algorithm.md: lr {1e-5, 3e-5, 5e-5}, weight decay {1e-4, 1e-6}, dropout {0, 0.1, 0.5}; defaults 5e-5, 0, 0.
    "lr": ("5e-5", ("1e-5", "3e-5", "5e-5")),
    "weightDecay": ("0", ("1e-4", "1e-6")),
    "dropout": ("0", ("0", "0.1", "0.5")),
}
