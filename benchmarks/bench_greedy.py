"""Issue 7, target 2: greedy selection with a cheap evaluator.

``averaging.greedy_select`` keeps a running sum of the kept members, so each member is read from
disk exactly once; the reference rebuilds the candidate average from every selected member at
each step (O(N^2) reads). Both are run on the same N members (random, ResNet-18-sized by
default: 11.7 M fp32 parameters, ~47 MB, as safetensors files in a temp dir) with the same
evaluator, alternated and repeated; the benchmark checks they select the same members and give
bit-identical averages, counts the reads, and reports the speed-up.

The baseline uses the same float64 kernels as RunningSum (a fresh RunningSum per step), so the
ratio measures the algorithm, not an arithmetic difference.

The evaluator is cheap (microseconds): it scores a candidate by how close a 64x64 block of its
last layer is to a hidden target; members are made so that about half of them improve the
soup (kept) and half do not.

Usage: .venv/bin/python benchmarks/bench_greedy.py [--n 16] [--repeat 3] [--params 11.7e6]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def make_members(folder: Path, n: int, params: int, seed: int = 0):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    # a ResNet-like layout: a few big conv-like tensors, many small BN vectors, a head
    shapes = []
    left = params - 512 * 100
    big = 24
    per = left // big
    for i in range(big):
        shapes.append((f"featurizer.layer{i}.weight", (per // 576, 576)))
        shapes.append((f"featurizer.bn{i}.weight", (256,)))
        shapes.append((f"featurizer.bn{i}.running_mean", (256,)))
        shapes.append((f"featurizer.bn{i}.num_batches_tracked", ()))
    shapes.append(("head.weight", (100, 512)))
    target = torch.randn(64, 64, generator=g)
    base = {k: (torch.randn(s, generator=g) * 0.05 if k.endswith(("weight", "mean")) else
                torch.tensor(7, dtype=torch.int64)) for k, s in shapes}
    paths, own = [], []
    for i in range(n):
        sd = {}
        for k, v in base.items():
            if v.is_floating_point():
                sd[k] = v + torch.randn(v.shape, generator=g) * 0.01
            else:
                sd[k] = v.clone()
        # even members pull the head block towards the target, odd ones away from it
        pull = 0.6 if i % 2 == 0 else -0.8
        noise = torch.randn(64, 64, generator=g) * 0.3
        sd["head.weight"][:64, :64] = target * (0.5 + 0.1 * pull) + noise
        p = folder / f"member-{i:02d}.safetensors"
        save_file(sd, str(p))
        paths.append(str(p))
        own.append(float(-((sd["head.weight"][:64, :64] - target) ** 2).mean()))
    return paths, own, target


class Reads:
    def __init__(self):
        self.count = {}

    def loader(self, path):
        from ratatouille_trainer.weights import load_safetensors_file

        def load():
            self.count[path] = self.count.get(path, 0) + 1
            return load_safetensors_file(path)
        return load


def baseline_greedy(ranked, evaluate, reads: Reads):
    """The reference's approach: rebuild the candidate from all selected members each step."""
    import math

    from ratatouille_trainer.averaging import RunningSum, _sort_key

    order = [m for _, m in sorted(enumerate(ranked), key=_sort_key)]
    selected: list = []
    best = -math.inf
    final = None
    for name, load, _acc in order:
        rs = RunningSum()
        for sel_name, sel_load in selected + [(name, load)]:
            rs.add(sel_name, sel_load())
        cand = rs.mean()
        acc = float(evaluate(cand))
        if not selected or acc >= best:
            selected.append((name, load))
            best = acc
            final = cand
        del rs, cand
    return [n for n, _ in selected], final, best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--params", type=float, default=11.7e6)
    ap.add_argument("--out")
    args = ap.parse_args()

    import torch

    from ratatouille_trainer.averaging import greedy_select

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-greedy-"))
    m0 = common.machine()
    try:
        paths, own, target = make_members(tmp, args.n, int(args.params))
        size = Path(paths[0]).stat().st_size
        evals = [0]

        def evaluate(sd):
            evals[0] += 1
            return float(-((sd["head.weight"][:64, :64] - target) ** 2).mean())

        # page cache warm
        for p in paths:
            Path(p).read_bytes()
        # one untimed run of each first (allocator and page-cache warm-up)
        for fn in ("ours", "baseline"):
            rd = Reads()
            ranked = [(f"m{i:02d}", rd.loader(p), own[i]) for i, p in enumerate(paths)]
            greedy_select(ranked, evaluate) if fn == "ours" else baseline_greedy(ranked, evaluate, rd)
        walls = {"ours": [], "baseline": []}
        reads = {}
        out = {}
        for r in range(args.repeat):
            for mode in (("ours", "baseline") if r % 2 == 0 else ("baseline", "ours")):
                rd = Reads()
                ranked = [(f"m{i:02d}", rd.loader(p), own[i]) for i, p in enumerate(paths)]
                t0 = time.perf_counter()
                if mode == "ours":
                    res = greedy_select(ranked, evaluate)
                    sel, state, best = res.selected, res.state_dict, res.val_accuracy
                else:
                    sel, state, best = baseline_greedy(ranked, evaluate, rd)
                walls[mode].append(time.perf_counter() - t0)
                reads[mode] = rd.count
                out[mode] = (sel, state, best)
                print(f"{mode:8s} {walls[mode][-1]:.3f} s  reads {sum(rd.count.values())}", flush=True)
        (s1, st1, b1), (s2, st2, b2) = out["ours"], out["baseline"]
        same = s1 == s2 and b1 == b2 and all(torch.equal(st1[k], st2[k]) for k in st1)
        med = {k: common.median(v) for k, v in walls.items()}
        figures = {
            "machine_start": m0, "machine_end": common.machine(),
            "n": args.n, "member_bytes": size, "selected": len(s1),
            "ours_s": round(med["ours"], 3), "baseline_s": round(med["baseline"], 3),
            "walls": {k: [round(x, 3) for x in v] for k, v in walls.items()},
            "speedup": round(med["baseline"] / med["ours"], 2),
            "speedup_paired_median": round(common.median(
                [b / a for a, b in zip(walls["ours"], walls["baseline"])]), 2),
            "reads_ours": sum(reads["ours"].values()),
            "each_member_read_once": sorted(reads["ours"].values()) == [1] * args.n,
            "reads_baseline": sum(reads["baseline"].values()),
            "same_selection_and_bit_identical_average": same,
            "target": ">= 4x at N=16, each member read once",
        }
        figures["met"] = figures["speedup"] >= 4 and figures["each_member_read_once"] and same
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    common.emit("bench_greedy", figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
