"""Issue 7, target 3: trainer step throughput vs a bare PyTorch loop (CPU here; GPU: gpu_check.py).

For each model (timm ``test_resnet``, ``resnet18``) and input size (32, 64): the same network
(``build_network`` + ``freeze_bn``, same initial weights), the same batch (``--batch`` images per
training domain x 3 domains) and in-memory data, trained with

  trainer  ``training.train`` (the stages' loop: sampler, batched DomainBed augmentation,
           phase bookkeeping, loss.item(), progress), per-step wall time from the progress hook
  bare     ``for x, y in batches: loss = F.cross_entropy(net(x), y); zero_grad; backward; step``
           over batches prepared beforehand (already augmented and normalised)

alternated and repeated; medians of the per-step times after warm-up are compared. The time the
trainer waited for a batch (sampling + augmentation, made in a background thread when the
process runs one intra-op thread) is reported as "data wait" (``TrainResult.data_wait_seconds``).
Beside the wall times, the process CPU time per step (all threads: the trainer's includes making
the next batch) and the CPU time to make one batch alone are reported: on a shared machine, where
the second core is rarely free, the wall-time gap follows the CPU-time gap. ``--sync`` adds the
trainer without the background thread (``RATATOUILLE_PREFETCH=0``); ``--before`` adds the loop as
it was before issue 7 (batches made with every intra-op thread) for comparison.

Usage: .venv/bin/python benchmarks/bench_trainer.py [--models test_resnet resnet18]
       [--sizes 32 64] [--steps 12] [--repeat 3] [--batch 32] [--threads 1] [--sync] [--before]
       [--out figures.json]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def synthetic_dataset(size: int, per_domain: int = 384, classes: int = 10, seed: int = 0):
    import torch

    from ratatouille_trainer.data import Domain, DomainDataset, split_indices

    g = torch.Generator().manual_seed(seed)
    domains = []
    for i, name in enumerate(["a", "b", "c"]):
        images = torch.randint(0, 256, (per_domain, 3, size, size), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, classes, (per_domain,), generator=g)
        out_idx, in_idx = split_indices(per_domain, 0.2, seed + i)
        domains.append(Domain(name, i, images, labels, torch.tensor(out_idx), torch.tensor(in_idx)))
    return DomainDataset(uri="memory://bench", root="", classes=[str(c) for c in range(classes)],
                         domains=domains, input_size=size)


class StepClock:
    """A progress sink that timestamps every step (the trainer calls update once per step)."""

    def __init__(self):
        self.stamps = []
        self.cpu = []

    def update(self, step, **_):
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def emit(self, *a, **k):
        pass

    def steps(self, warmup: int, cpu: bool = False) -> list[float]:
        s = self.cpu if cpu else self.stamps
        d = [b - a for a, b in zip(s, s[1:])]
        return d[warmup:-1] if len(d) > warmup + 1 else d  # the last step is followed by eval


def cpu_context(data_threads: str, prefetch: bool = True):
    from ratatouille_trainer.device import select_device

    return select_device({"RATATOUILLE_DEVICE": "cpu", "RATATOUILLE_DATA_THREADS": data_threads,
                          "RATATOUILLE_PREFETCH": "1" if data_threads and prefetch else "0"})


def run_trainer(net, ds, batch: int, steps: int, lr: float, seed: int, data_threads: str = "1",
                prefetch: bool = True):
    """The product's loop with the product's CPU context (``select_device``); data_threads ""
    is the behaviour before issue 7 (batches made in the loop with every intra-op thread)."""
    from ratatouille_trainer.data import TrainStream
    from ratatouille_trainer.training import Evaluator, Phase, train

    ctx = cpu_context(data_threads, prefetch)
    stream = TrainStream(ds, batch, seed)
    val = [(n, x[:8], y[:8]) for n, x, y in ds.validation_sets()]  # tiny: eval is not timed
    clock = StepClock()
    res = train(net, stream, Evaluator(val, ctx), steps=steps, eval_every=10 ** 9,
                phases=[Phase(0, "all", lr, 0.0)], ctx=ctx, keep="last", progress=clock, seed=seed)
    clock.data_wait = res.data_wait_seconds / steps
    return clock


def run_bare(net, batches, lr: float) -> tuple[list[float], list[float]]:
    """(wall, process CPU) seconds per step. The optimizer is built as the trainer builds it
    (``torch.optim.Adam(params, lr=, weight_decay=)``, torch's defaults otherwise)."""
    import torch
    import torch.nn.functional as F

    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=0.0)
    times, cpu = [], []
    for x, y in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # as any loop that logs its loss
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


def batch_cpu_seconds(ds, batch: int, n: int = 10) -> float:
    """Median CPU time (this thread) to make one training batch (sampling + augmentation +
    normalisation) with one intra-op thread, as the trainer makes it."""
    import torch

    from ratatouille_trainer.data import TrainStream, train_transform

    stream = TrainStream(ds, batch, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for i in range(n + 2):
            t0 = time.thread_time()
            xb, _ = stream.next_raw()
            train_transform(xb, stream.aug_gen)
            out.append(time.thread_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return common.median(out[2:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["test_resnet", "resnet18"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="images per training domain (3 domains)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads for both loops (0: torch's default)")
    ap.add_argument("--before", action="store_true",
                    help="also run the loop as before issue 7 (batches made with all threads)")
    ap.add_argument("--sync", action="store_true",
                    help="also run the trainer without the background batch thread")
    ap.add_argument("--out")
    args = ap.parse_args()

    import torch

    from ratatouille_trainer.data import TrainStream, train_transform
    from ratatouille_trainer.models import build_network, freeze_bn
    from ratatouille_trainer.training import BatchSource

    if args.threads:
        torch.set_num_threads(args.threads)
    figures = {"machine_start": common.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "batch_images": args.batch * 3, "configs": {}}
    lr = 5e-5
    for model in args.models:
        for size in args.sizes:
            ds = synthetic_dataset(size)
            torch.manual_seed(0)
            net0 = freeze_bn(build_network(model, ds.num_classes, 0.0, size))
            # the bare loop's in-memory batches: the trainer's own batches, made beforehand
            stream = TrainStream(ds, args.batch, 1)
            batches = []
            for _ in range(args.steps + args.warmup):
                xb, yb = stream.next_raw()
                batches.append((train_transform(xb, stream.aug_gen), yb))
            # fairness: they are exactly the batches the trainer's loop makes (same seed)
            src = BatchSource(TrainStream(ds, args.batch, 1), cpu_context("1", False), 2)
            try:
                for (x_t, y_t), (x_b, y_b) in zip((src.next(), src.next()), batches):
                    assert torch.equal(x_t, x_b) and torch.equal(y_t, y_b), "bare batches differ"
            finally:
                src.close()
            modes = (["trainer", "bare"] + (["trainer-sync"] if args.sync else [])
                     + (["trainer-before"] if args.before else []))
            per = {m: [] for m in modes}
            cpu = {m: [] for m in modes}
            waits = {m: [] for m in modes if m != "bare"}
            pairs = []
            load_before = common.machine()["load"]
            batch_cpu = batch_cpu_seconds(ds, args.batch)
            for r in range(args.repeat):
                got = {}
                for mode in (modes if r % 2 == 0 else modes[::-1]):
                    net = copy.deepcopy(net0)
                    if mode.startswith("trainer"):
                        clock = run_trainer(net, ds, args.batch, args.steps + args.warmup + 1, lr, 1,
                                            "" if mode == "trainer-before" else "1",
                                            prefetch=mode != "trainer-sync")
                        got[mode] = common.median(clock.steps(args.warmup))
                        cpu[mode].append(common.median(clock.steps(args.warmup, cpu=True)))
                        waits[mode].append(clock.data_wait)
                    else:
                        wall, cpu_s = run_bare(net, batches, lr)
                        got[mode] = common.median(wall[args.warmup:])
                        cpu[mode].append(common.median(cpu_s[args.warmup:]))
                    per[mode].append(got[mode])
                pairs.append(got["bare"] / got["trainer"])
                print(f"{model}@{size} " + "  ".join(f"{m} {got[m] * 1000:.1f} ms/step" for m in modes)
                      + f"  ratio {pairs[-1]:.3f}", flush=True)
            t, b = common.median(per["trainer"]), common.median(per["bare"])
            wait = common.median(waits["trainer"])
            tc, bc = common.median(cpu["trainer"]), common.median(cpu["bare"])
            cfg = {
                "model": model, "input_size": size, "load_before": load_before,
                "load_after": common.machine()["load"],
                "trainer_ms_per_step": round(t * 1000, 2), "bare_ms_per_step": round(b * 1000, 2),
                "trainer_steps_ms": [round(x * 1000, 1) for x in per["trainer"]],
                "bare_steps_ms": [round(x * 1000, 1) for x in per["bare"]],
                "paired_ratios": [round(x, 3) for x in pairs],
                "trainer_cpu_ms_per_step": round(tc * 1000, 2), "bare_cpu_ms_per_step": round(bc * 1000, 2),
                "cpu_ratio": round(bc / tc, 3),
                "batch_cpu_ms": round(batch_cpu * 1000, 2),
                "trainer_images_per_s": round(args.batch * 3 / t, 1),
                "bare_images_per_s": round(args.batch * 3 / b, 1),
                "throughput_ratio": round(b / t, 3),
                "throughput_ratio_paired_median": round(common.median(pairs), 3),
                "data_wait_ms_per_step": round(wait * 1000, 2),
                "data_wait_share": round(wait / t, 3),
                "met": common.median(pairs) >= 0.9,
            }
            if args.sync:
                ts = common.median(per["trainer-sync"])
                cfg["sync_ms_per_step"] = round(ts * 1000, 2)
                cfg["sync_throughput_ratio"] = round(b / ts, 3)
                cfg["sync_data_wait_ms_per_step"] = round(common.median(waits["trainer-sync"]) * 1000, 2)
            if args.before:
                tb = common.median(per["trainer-before"])
                cfg["before_ms_per_step"] = round(tb * 1000, 2)
                cfg["before_throughput_ratio"] = round(b / tb, 3)
                cfg["before_data_wait_ms_per_step"] = round(common.median(waits["trainer-before"]) * 1000, 2)
            figures["configs"][f"{model}@{size}"] = cfg
    figures["machine_end"] = common.machine()
    common.emit("bench_trainer", figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
