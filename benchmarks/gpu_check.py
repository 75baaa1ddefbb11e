"""Issue 7, target 3 on a GPU: the trainer's step vs a bare PyTorch loop, resnet50 at 224.

A short, prepared device check (well under 5 minutes on one H100/H200-class GPU):

  trainer      ``training.train`` with ``select_device()`` (bf16 autocast, channels_last, the
               uint8 image cache on the GPU, augmentation on the GPU, non-blocking copies)
  bare-amp     a bare loop over batches already on the GPU, same bf16 autocast + channels_last
  bare-fp32    a bare loop in plain fp32 (what "no tricks" gives, for reference)
  trainer-compiled (with --compile) the trainer with RATATOUILLE_COMPILE=1 (torch.compile)

Same network (``build_network("resnet50") + freeze_bn``, same initial weights), same batch
(--batch images per domain x 3 domains), Adam, alternated and repeated; medians of per-step
times after warm-up (every step ends with a loss.item(), so steps are synchronised). Also the
time to produce one batch on the GPU ("data wait"). Writes everything to --out as JSON.

Usage (on the device machine, from the repository root):
  python benchmarks/gpu_check.py --out $OUT/gpu_check.json [--compile]
Dry run on a CPU (checks the script, numbers meaningless):
  python benchmarks/gpu_check.py --device cpu --model test_resnet --size 32 --batch 4 --steps 3 --warmup 1 --repeat 1 --out /tmp/g.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "trainer"))

import bench_trainer  # noqa: E402  (synthetic_dataset, StepClock)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32, help="images per domain (3 domains)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu (dry run)")
    ap.add_argument("--budget-s", type=float, default=270, help="stop starting new runs after this")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t_start = time.monotonic()

    import torch
    import torch.nn.functional as F

    from ratatouille_trainer.data import TrainStream, train_transform
    from ratatouille_trainer.device import DeviceContext, select_device
    from ratatouille_trainer.models import build_network, freeze_bn
    from ratatouille_trainer.training import Evaluator, Phase, train

    os.environ["RATATOUILLE_DEVICE"] = args.device if args.device != "auto" else "auto"
    ctx = select_device()
    dev = ctx.device
    out: dict = {"host": platform.node(), "torch": torch.__version__, "device": ctx.describe(),
                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                 "cuda": torch.version.cuda, "model": args.model, "input_size": args.size,
                 "batch_images": args.batch * 3, "steps": args.steps, "warmup": args.warmup,
                 "runs": {}, "complete": False}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    ds = bench_trainer.synthetic_dataset(args.size, per_domain=max(args.batch * 4, 64))
    torch.manual_seed(0)
    net0 = freeze_bn(build_network(args.model, ds.num_classes, 0.0, args.size))
    lr = 5e-5
    n_steps = args.steps + args.warmup

    # batches for the bare loops: the trainer's own batches, augmented once, on the device
    stream = TrainStream(ds, args.batch, 1).to(dev)
    batches = []
    for _ in range(n_steps):
        xb, yb = stream.next_raw()
        batches.append((train_transform(xb, stream.aug_gen).contiguous(), yb))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_trainer(compiled: bool) -> list[float]:
        c = ctx
        if compiled:
            c = DeviceContext(**{**ctx.__dict__, "compile": True})
        net = copy.deepcopy(net0)
        st = TrainStream(ds, args.batch, 1)
        val = [(n, x[:16], y[:16]) for n, x, y in ds.validation_sets()]
        clock = bench_trainer.StepClock()
        train(net, st, Evaluator(val, c), steps=n_steps + 1, eval_every=10 ** 9,
              phases=[Phase(0, "all", lr, 0.0)], ctx=c, keep="last", progress=clock, seed=1)
        return clock.steps(args.warmup)

    def run_bare(amp: bool) -> list[float]:
        net = copy.deepcopy(net0).to(dev)
        if amp and dev.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        times = []
        for x, y in batches:
            if amp and dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                                enabled=amp and ctx.amp_dtype is not None):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            float(loss)
            times.append(time.perf_counter() - t0)
        return times[args.warmup:]

    def data_wait() -> float:
        st = TrainStream(ds, args.batch, 2).to(dev)
        ts = []
        for _ in range(10):
            sync()
            t0 = time.perf_counter()
            xb, _yb = st.next_raw()
            train_transform(xb, st.aug_gen)
            sync()
            ts.append(time.perf_counter() - t0)
        return median(ts[2:])

    modes = ["trainer", "bare-amp", "bare-fp32"]
    results = {m: [] for m in modes}
    for r in range(args.repeat):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            if time.monotonic() - t_start > args.budget_s:
                out["stopped_early"] = f"budget {args.budget_s} s reached"
                break
            steps = run_trainer(False) if mode == "trainer" else run_bare(mode == "bare-amp")
            results[mode].append(median(steps))
            out["runs"][mode] = {"ms_per_step": [round(x * 1000, 2) for x in results[mode]]}
            print(f"{mode:10s} {median(steps) * 1000:.1f} ms/step", flush=True)
            save()
    if args.compile and time.monotonic() - t_start < args.budget_s:
        t0 = time.monotonic()
        steps = run_trainer(True)
        results["trainer-compiled"] = [median(steps)]
        out["runs"]["trainer-compiled"] = {"ms_per_step": [round(median(steps) * 1000, 2)],
                                           "wall_incl_compile_s": round(time.monotonic() - t0, 1)}
        print(f"trainer-compiled {median(steps) * 1000:.1f} ms/step", flush=True)
    summary = {}
    for mode, xs in results.items():
        if xs:
            summary[mode] = {"ms_per_step": round(median(xs) * 1000, 2),
                             "images_per_s": round(args.batch * 3 / median(xs), 1)}
    if results["trainer"] and results["bare-amp"]:
        summary["ratio_trainer_vs_bare_amp"] = round(median(results["bare-amp"]) / median(results["trainer"]), 3)
    if results["trainer"] and results["bare-fp32"]:
        summary["ratio_trainer_vs_bare_fp32"] = round(median(results["bare-fp32"]) / median(results["trainer"]), 3)
    summary["data_wait_ms"] = round(data_wait() * 1000, 2)
    out["summary"] = summary
    out["complete"] = True
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    save()
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
