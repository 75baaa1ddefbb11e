"""The trainer's data path changes of issue 7: batches made with one intra-op thread, made ahead
in a background thread when the process runs one thread, and the vectorised crop sampling —
all giving exactly the batches (and checkpoints) of the plain path. Fast, no timing assertions."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import torch

from ratatouille_trainer import data as D
from ratatouille_trainer.device import DeviceContext, select_device
from ratatouille_trainer.training import BatchSource


def _dataset(size=16, per_domain=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    domains = []
    for i, name in enumerate(["a", "b", "c"]):
        images = torch.randint(0, 256, (per_domain, 3, size, size), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 4, (per_domain,), generator=g)
        out_idx, in_idx = D.split_indices(per_domain, 0.2, i)
        domains.append(D.Domain(name, i, images, labels, torch.tensor(out_idx), torch.tensor(in_idx)))
    return D.DomainDataset(uri="memory://t", root="", classes=list("wxyz"), domains=domains,
                           input_size=size)


def _reference_boxes(n, size, g, scale=(0.7, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """The per-image loop the vectorised sampler replaced (torchvision's get_params)."""
    area = float(size * size)
    u = torch.rand(n, 10, 4, generator=g, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    ar = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * ar))
    h = torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    boxes = torch.empty(n, 4, dtype=torch.float64)
    for k in range(n):
        js = [j for j in range(10) if bool(ok[k, j])]
        if not js:
            boxes[k] = torch.tensor([0.0, 0.0, float(size), float(size)], dtype=torch.float64)
            continue
        j = js[0]
        wk, hk = float(w[k, j]), float(h[k, j])
        top = math.floor(u[k, j, 2].item() * (size - hk + 1))
        left = math.floor(u[k, j, 3].item() * (size - wk + 1))
        boxes[k] = torch.tensor([left, top, left + wk, top + hk], dtype=torch.float64)
    return boxes


def test_vectorised_crop_boxes_equal_the_loop():
    for size in (8, 32, 224):
        for seed in range(4):
            a = D._rrc_boxes(300, size, torch.Generator().manual_seed(seed))
            b = _reference_boxes(300, size, torch.Generator().manual_seed(seed))
            assert torch.equal(a, b), (size, seed)
    # no try fits: every image falls back to the whole frame
    a = D._rrc_boxes(50, 16, torch.Generator().manual_seed(1), scale=(0.99, 1.0), ratio=(3.0, 4.0))
    b = _reference_boxes(50, 16, torch.Generator().manual_seed(1), scale=(0.99, 1.0), ratio=(3.0, 4.0))
    assert torch.equal(a, b) and torch.equal(a[0], torch.tensor([0.0, 0.0, 16.0, 16.0], dtype=torch.float64))


def test_data_scope_uses_one_thread_and_restores():
    ctx = select_device({"RATATOUILLE_DEVICE": "cpu"})
    assert ctx.data_threads == 1 and ctx.prefetch
    before = torch.get_num_threads()
    seen = []
    with ctx.data_scope():
        seen.append(torch.get_num_threads())
    assert seen == [1] and torch.get_num_threads() == before
    assert select_device({"RATATOUILLE_DEVICE": "cpu", "RATATOUILLE_PREFETCH": "0"}).prefetch is False
    assert select_device({"RATATOUILLE_DEVICE": "cpu", "RATATOUILLE_DATA_THREADS": ""}).data_threads is None


def _batches(ctx, n, take_state_at=None):
    ds = _dataset()
    src = BatchSource(D.TrainStream(ds, 4, seed=3), ctx, n)
    out, state = [], None
    try:
        for i in range(n):
            if i == take_state_at:
                state = src.state()
            out.append(src.next())
        return out, state, src.prefetching, src.wait_seconds
    finally:
        src.close()


def test_prefetched_batches_and_checkpoint_state_equal_the_plain_ones():
    plain_ctx = DeviceContext(device=torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pf_ctx = select_device({"RATATOUILLE_DEVICE": "cpu"})
        got, state, prefetching, waited = _batches(pf_ctx, 6, take_state_at=4)
    finally:
        torch.set_num_threads(threads)
    assert prefetching and waited > 0
    ref, ref_state, ref_prefetching, _ = _batches(plain_ctx, 6, take_state_at=4)
    assert not ref_prefetching
    for (x, y), (rx, ry) in zip(got, ref):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    # the state a checkpoint records before step 4 resumes at batch 4, with prefetching too
    assert state == ref_state
    ds = _dataset()
    stream = D.TrainStream(ds, 4, seed=3)
    stream.set_state(state)
    src = BatchSource(stream, plain_ctx, 2)
    x, y = src.next()
    assert torch.equal(x, got[4][0]) and torch.equal(y, got[4][1])


def test_launched_ahead_batches_and_checkpoint_state_equal_the_plain_ones(tmp_path, monkeypatch):
    """CUDA's launch-ahead (here on the CPU: the same bookkeeping): batch s+1 made right after
    step s's backward gives the plain batches, the state a checkpoint takes between steps is the
    one before the batch already made, and whole trainings (with a resume from a checkpoint
    taken while a batch was made ahead) end with the same model."""
    import pytest
    from ratatouille_trainer.models import build_network, freeze_bn
    from ratatouille_trainer.storage import open_storage
    from ratatouille_trainer.training import Checkpointer, Evaluator, Phase, SimulatedCrash, train

    plain = DeviceContext(device=torch.device("cpu"))
    ahead = DeviceContext(device=torch.device("cpu"), launch_ahead=True)
    assert select_device({"RATATOUILLE_DEVICE": "cpu"}).launch_ahead is False   # CUDA only
    ds = _dataset()
    src = BatchSource(D.TrainStream(ds, 4, seed=3), ahead, 6)
    got, state = [], None
    for i in range(6):
        if i == 4:
            state = src.state()
        got.append(src.next())
        src.launch_next()
        assert (src._ready is not None) == (i < 5)          # nothing made past the last step
    ref, ref_state, _, _ = _batches(plain, 6, take_state_at=4)
    assert all(torch.equal(x, rx) and torch.equal(y, ry) for (x, y), (rx, ry) in zip(got, ref))
    assert state == ref_state

    def run(ctx, steps, ckpt=None):
        torch.manual_seed(0)
        net = freeze_bn(build_network("test_resnet", 4, 0.1, 16))
        return train(net, D.TrainStream(ds, 4, 1), Evaluator(ds.validation_sets(), ctx), steps=steps,
                     eval_every=2, phases=[Phase(0, "head", 1e-3, 0.0), Phase(2, "all", 1e-4, 0.0)],
                     ctx=ctx, keep="last", seed=1, checkpointer=ckpt)

    want = run(plain, 6).state
    assert all(torch.equal(want[k], v) for k, v in run(ahead, 6).state.items())
    store = open_storage(str(tmp_path))
    monkeypatch.setenv("RATATOUILLE_ABORT_AT_STEP", "3")   # stops after step 2's checkpoint, taken
    with pytest.raises(SimulatedCrash):                    # with step 3's batch already made
        run(ahead, 6, Checkpointer(store, str(tmp_path / "ck"), "fp"))
    monkeypatch.delenv("RATATOUILLE_ABORT_AT_STEP")
    resumed = run(ahead, 6, Checkpointer(store, str(tmp_path / "ck"), "fp"))
    assert resumed.resumed_from == 2
    assert all(torch.equal(want[k], v) for k, v in resumed.state.items())


def test_train_with_prefetch_matches_train_without(tmp_path):
    """Whole loop in a one-thread process: prefetching on and off give the same model."""
    code = textwrap.dedent("""
        import sys, torch
        torch.set_num_threads(1)
        sys.path.insert(0, %r)
        from test_trainer_perf import _dataset
        from ratatouille_trainer.data import TrainStream
        from ratatouille_trainer.device import select_device
        from ratatouille_trainer.models import build_network, freeze_bn
        from ratatouille_trainer.training import Evaluator, Phase, train
        outs = []
        for pf in ("1", "0"):
            ds = _dataset()
            torch.manual_seed(0)
            net = freeze_bn(build_network("test_resnet", 4, 0.1, 16))
            ctx = select_device({"RATATOUILLE_DEVICE": "cpu", "RATATOUILLE_PREFETCH": pf})
            res = train(net, TrainStream(ds, 4, 1), Evaluator(ds.validation_sets(), ctx), steps=5,
                        eval_every=2, phases=[Phase(0, "head", 1e-3, 0.0), Phase(2, "all", 1e-4, 0.0)],
                        ctx=ctx, keep="last", seed=1)
            outs.append((res.state, res.data_wait_seconds))
        (a, wa), (b, wb) = outs
        assert all(torch.equal(a[k], b[k]) for k in a), "models differ"
        assert wa > 0 and wb > 0
        print("same")
    """) % str(__import__("pathlib").Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("same")


# ------------------------------------------------- the cheaper augmentation (issue 7, part 3)

def _images(b, size, seed, kind="random"):
    x = torch.randint(0, 256, (b, 3, size, size), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.uint8)
    if kind == "flat":          # grey pixels: max == min (the hue's zero-chroma case)
        x[:] = 128
    elif kind == "ties":        # r == g everywhere, and some black and white pixels
        x[:, 0] = x[:, 1]
        x[:, :, :2] = 0
        x[:, :, -2:] = 255
    elif kind == "few":         # few distinct values: many max ties between channels
        x = (x // 128) * 255
    return x


def _bits(t):
    return t.contiguous().view(torch.int32)


def test_augment_batch_is_bit_identical_to_the_reference():
    """The regrouped, in-place, where/fmod-free augmentation gives exactly the numbers of the
    straightforward form (the code before it), for batch sizes with empty and full jitter groups
    and the hue's special cases."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = [(b, size, seed, kind) for size in (8, 16, 32) for b in (1, 2, 7, 96)
                 for seed, kind in ((0, "random"), (1, "flat"), (2, "ties"), (3, "few"))]
        cases += [(96, 64, 4, "random"), (5, 224, 5, "ties")]
        for b, size, seed, kind in cases:
            x = _images(b, size, seed, kind)
            got = D.augment_batch(x, torch.Generator().manual_seed(seed))
            ref = D.augment_batch_reference(x, torch.Generator().manual_seed(seed))
            assert got.shape == ref.shape and got.dtype == ref.dtype
            assert torch.equal(_bits(got), _bits(ref)), (b, size, seed, kind)
        # the generator is left where the reference leaves it (the next batch is the same too)
        g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        x = _images(12, 16, 9)
        D.augment_batch(x, g1)
        D.augment_batch_reference(x, g2)
        assert torch.equal(g1.get_state(), g2.get_state())
        # train/eval transforms: normalisation in place gives normalize()'s numbers
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(_bits(D.train_transform(x, g1)),
                           _bits(D.normalize(D.augment_batch_reference(x, g2))))
        assert torch.equal(_bits(D.eval_transform(x)), _bits(D.normalize(x.float() / 255.0)))
    finally:
        torch.set_num_threads(threads)


def _floats(lo, hi):
    """Every float32 in [lo, hi) (lo, hi >= 0)."""
    a = torch.tensor([lo], dtype=torch.float32).view(torch.int32).item()
    b = torch.tensor([hi], dtype=torch.float32).view(torch.int32).item()
    return torch.arange(a, b, dtype=torch.int32).view(torch.float32)


def _near(v, ulps=1 << 16):
    """Every float32 within ``ulps`` of v (v > 0)."""
    c = torch.tensor([v], dtype=torch.float32).view(torch.int32).item()
    return torch.arange(c - ulps, c + ulps, dtype=torch.int32).view(torch.float32)


def test_hue_shift_arithmetic_equals_fmod_and_remainder():
    """The replacements in ``_hue_shift`` on the ranges their arguments lie in (the full ranges
    were checked exhaustively when they were written; here: every float32 near the points where
    the result jumps, the whole of [1, 2) and a random sample elsewhere)."""
    g = torch.Generator().manual_seed(0)
    # fmod(t, 1) on [5/6, 2) -> t - floor(t)
    t = torch.cat([_floats(1.0, 2.0), _near(1.0), 0.5 + 1.5 * torch.rand(1 << 20, generator=g)])
    assert torch.equal(_bits(torch.fmod(t, 1.0)), _bits(t - torch.floor(t)))
    # remainder(t, 1) on [-0.3, 1.3] -> t - floor(t) (equal values; a zero's sign may differ,
    # and the next op adds n >= 1 to it)
    t = torch.cat([_floats(1.0, 1.3), _near(1.0), -_near(1.0 / 4096), -_floats(0.0, 1e-30),
                   _floats(0.0, 1e-30), -0.3 + 1.6 * torch.rand(1 << 21, generator=g),
                   torch.tensor([0.0, -0.0, 1.0, -0.3, 1.3])])
    assert torch.equal(torch.remainder(t, 1.0), t - torch.floor(t))
    # remainder(k, 6) on [1, 11] -> k - 6 * floor(k / 6)
    k = torch.cat([_floats(5.0, 7.0), _near(6.0), _near(1.0), _near(11.0),
                   1.0 + 10.0 * torch.rand(1 << 21, generator=g)])
    assert torch.equal(_bits(torch.remainder(k, 6.0)), _bits(k - torch.floor(k / 6.0) * 6.0))
    # the divisor for zero chroma: 0 / clamp_min(0, tiny) == 0 / 1, positives unchanged
    d = torch.cat([torch.tensor([0.0]), _floats(0.0, 1e-37)[1:1 << 16], torch.rand(1 << 16, generator=g)])
    assert torch.equal(torch.where(d == 0, torch.ones_like(d), d)[1:], d.clamp_min(D._TINY)[1:])
    zero = torch.zeros(1)
    assert torch.equal(_bits(zero / zero.clamp_min(D._TINY)), _bits(zero / torch.ones(1)))
