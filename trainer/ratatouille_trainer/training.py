"""The training loop, evaluation and resumable checkpoints.

One explicit loop, as the reference runs it (DomainBed ``train.py``): steps are numbered
0..steps-1; each step concatenates one batch per training domain, takes one Adam step (no
schedule) on the cross-entropy; after step ``s`` the model is evaluated when ``s % evalEvery ==
0`` or ``s`` is the last step, and the best checkpoint by training-domain validation is kept
(strict ``>``: ties keep the earlier step). A *phase* list says which parameters train from
which step on; entering a phase builds a fresh Adam over its parameters (the reference's head
warm-up, and the linear-probe then fine-tune of auxiliary runs).

Training-domain validation, as in the reference: the member's score is DomainBed's
``get_score``, the mean over training domains of the out-split accuracy (``ValScore.mean``);
the pooled accuracy over the concatenated out splits (``ValScore.pooled``, what greedy
selection uses) is recorded beside it.

Every evaluation also writes a checkpoint to ``<output>/checkpoint/<attempt>/`` (one folder per
writer, ratatouille_contract.layout) through the storage: the model, the Adam state (flattened
into safetensors + JSON), RNG states of the samplers, the augmentation and dropout, the curve
and the best-so-far, with ``state.json`` written last as the pointer. A resumed run (a later
attempt) continues after the newest checkpointed step with the same RNG states, so it reproduces
an uninterrupted run exactly on the CPU.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from ratatouille_contract import layout
from ratatouille_contract.layout import CHECKPOINT_MODEL, CHECKPOINT_OPTIMIZER, CHECKPOINT_STATE, join

from .weights import load_safetensors_file, save_state_dict
from .data import TrainStream, eval_transform, list_to_state, state_to_list, train_transform
from .device import DeviceContext
from .models import Network, cpu_state

CHECKPOINT_VERSION = 1
EVAL_BATCH = 256


class SimulatedCrash(RuntimeError):
    """Raised by the fault-injection hook ``RATATOUILLE_ABORT_AT_STEP`` (tests)."""


class Diverged(RuntimeError):
    """The loss or the weights became NaN/Inf: the stage fails (reason ``Diverged``), nothing is
    marked done, and no checkpoint of the diverged state is written."""


def check_finite_state(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`Diverged` naming the first floating tensor of ``state`` with NaN/Inf."""
    for key, t in state.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise Diverged(f"{what}: tensor {key} has NaN/Inf values")


# ---------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def correct_count(net: Network, images: torch.Tensor, labels: torch.Tensor,
                  ctx: DeviceContext | None = None, batch_size: int = EVAL_BATCH) -> tuple[int, int]:
    """(correct, total) of ``net`` on uint8 images [N, 3, S, S] (resize-only evaluation)."""
    ctx = ctx or DeviceContext(device=next(net.parameters()).device)
    was_training = net.training
    net.eval()
    correct = 0
    try:
        for i in range(0, int(labels.shape[0]), batch_size):
            x = ctx.input(eval_transform(ctx.to_device(images[i:i + batch_size])))
            y = ctx.to_device(labels[i:i + batch_size])
            with ctx.autocast():
                logits = net(x)
            correct += int((logits.float().argmax(1) == y).sum().item())
    finally:
        net.train(was_training)
    return correct, int(labels.shape[0])


def evaluate(net: Network, data, ctx: DeviceContext | None = None) -> float:
    """Accuracy of ``net`` on ``(images, labels)`` or on a list of such pairs / of
    ``(name, images, labels)`` triples pooled together."""
    if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]):
        data = [data]
    correct = total = 0
    for item in data:
        x, y = (item[1], item[2]) if len(item) == 3 else item
        c, t = correct_count(net, x, y, ctx)
        correct += c
        total += t
    if total == 0:
        raise ValueError("nothing to evaluate on")
    return correct / total


@dataclass
class ValScore:
    mean: float                     # DomainBed get_score: mean of per-domain out accuracies
    pooled: float                   # accuracy over the concatenated out splits
    per_domain: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"valAccuracy": self.mean, "valAccuracyPooled": self.pooled,
                "valAccuracyPerDomain": dict(self.per_domain)}


class Evaluator:
    """Training-domain validation over ``[(domain, images, labels)]`` (the out splits)."""

    def __init__(self, sets: Sequence[tuple[str, torch.Tensor, torch.Tensor]], ctx: DeviceContext):
        if not sets:
            raise ValueError("no validation data")
        self.ctx = ctx
        self.sets = []
        for name, x, y in sets:
            if ctx.is_cuda and x.numel() <= ctx.device_cache_bytes:
                x, y = x.to(ctx.device), y.to(ctx.device)
            self.sets.append((name, x, y))

    def score(self, net: Network) -> ValScore:
        per, correct, total = {}, 0, 0
        for name, x, y in self.sets:
            c, t = correct_count(net, x, y, self.ctx)
            per[name] = c / t
            correct += c
            total += t
        return ValScore(mean=sum(per.values()) / len(per), pooled=correct / total, per_domain=per)

    @torch.no_grad()
    def score_with_probs(self, net: Network) -> tuple[ValScore, torch.Tensor, torch.Tensor]:
        """``score`` plus, from the same forward passes, the softmax probabilities [N, C] (CPU,
        float32) and the argmax predictions [N] over the validation sets in order (the average
        stage's ensemble and disagreement diagnostics)."""
        was_training = net.training
        net.eval()
        per, correct, total, probs, preds = {}, 0, 0, [], []
        try:
            for name, x, y in self.sets:
                c = 0
                for i in range(0, int(y.shape[0]), EVAL_BATCH):
                    xb = self.ctx.input(eval_transform(self.ctx.to_device(x[i:i + EVAL_BATCH])))
                    yb = self.ctx.to_device(y[i:i + EVAL_BATCH])
                    with self.ctx.autocast():
                        logits = net(xb)
                    logits = logits.float()
                    pred = logits.argmax(1)
                    c += int((pred == yb).sum().item())
                    probs.append(logits.softmax(1).cpu())
                    preds.append(pred.cpu())
                t = int(y.shape[0])
                per[name] = c / t
                correct += c
                total += t
        finally:
            net.train(was_training)
        score = ValScore(mean=sum(per.values()) / len(per), pooled=correct / total, per_domain=per)
        return score, torch.cat(probs), torch.cat(preds)

    def labels(self) -> torch.Tensor:
        """The validation labels in the order of ``score_with_probs`` (CPU)."""
        return torch.cat([y.cpu() for _, _, y in self.sets])


def test_accuracies(net: Network, domains, ctx: DeviceContext) -> dict[str, float]:
    """Accuracy on each whole test domain."""
    return {d.name: evaluate(net, (d.images, d.labels), ctx) for d in domains}


# ------------------------------------------------------------------------------- optimizers

@dataclass(frozen=True)
class Phase:
    start: int          # first step (0-based) of this phase
    trainable: str      # "head" or "all"
    lr: float
    weight_decay: float


def phase_index(phases: Sequence[Phase], step: int) -> int:
    idx = 0
    for i, p in enumerate(phases):
        if p.start <= step:
            idx = i
    return idx


def set_trainable(net: Network, phase: Phase) -> list[torch.nn.Parameter]:
    if phase.trainable not in ("head", "all"):
        raise ValueError(f"unknown phase {phase.trainable!r}")
    train_feat = phase.trainable == "all"
    for p in net.featurizer.parameters():
        p.requires_grad_(train_feat)
    for p in net.head.parameters():
        p.requires_grad_(True)
    return list(net.parameters()) if train_feat else list(net.head.parameters())


def make_optimizer(net: Network, phase: Phase) -> torch.optim.Adam:
    params = set_trainable(net, phase)
    return torch.optim.Adam(params, lr=phase.lr, weight_decay=phase.weight_decay)


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": json.loads(json.dumps(sd["param_groups"])), "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------ checkpoints

class Checkpointer:
    """Checkpoints through a storage, one folder per attempt (ratatouille_contract.layout): this writer's are
    under ``<root>/<attempt>/``: ``step-XXXXXXXX/{model,optimizer}.safetensors`` and
    ``state.json`` (written last; the pointer). Older step folders of this attempt are removed
    except the latest and the best; nothing of another attempt is written or deleted while
    training, so a stale writer never deletes the current one's checkpoint.

    :meth:`load` finds the newest complete checkpoint (highest step, then latest attempt) of the
    earlier attempts (and one written by an older trainer straight under ``<root>/``), and
    :meth:`fetch_state_dict` reads from it; the first :meth:`save` after resuming copies the
    best step's model from it, so this attempt's own folder is complete. :meth:`clear` (after
    DONE) removes every attempt. ``guard`` is called before every write (the lease's check)."""

    def __init__(self, storage, root: str, fingerprint: str, attempt: str | None = None,
                 guard: Callable[[], None] | None = None):
        self.storage = storage
        self.root = root.rstrip("/")
        self.attempt = attempt or layout.new_attempt()
        self._join = join
        self.prefix = join(self.root, self.attempt)
        self.fingerprint = fingerprint
        self.guard = guard or (lambda: None)
        self.source: str | None = None  # the prefix of the checkpoint load() found
        self.tmp = tempfile.mkdtemp(prefix="ratatouille-ckpt-")

    def uri(self, *parts: str) -> str:
        return self._join(self.prefix, *parts)

    @staticmethod
    def dirname(step: int) -> str:
        return f"step-{step:08d}"

    def _earlier(self) -> list[str]:
        """Prefixes holding a state.json: every earlier attempt, and the root (older trainers)."""
        out = []
        for rel, _, _ in self.storage.entries(self.root):
            parts = rel.split("/")
            if parts == [CHECKPOINT_STATE]:
                out.append(self.root)
            elif len(parts) == 2 and parts[1] == CHECKPOINT_STATE and layout.is_attempt(parts[0]) \
                    and parts[0] != self.attempt:
                out.append(self._join(self.root, parts[0]))
        return out

    def load(self) -> dict | None:
        from .storage import NotFound, StorageError

        found: tuple[int, str, dict] | None = None
        for prefix in self._earlier():
            uri = self._join(prefix, CHECKPOINT_STATE)
            try:
                state = self.storage.read_json(uri)
            except NotFound:
                continue
            except StorageError as e:
                if not self.storage.exists(uri):
                    raise
                self._discard(prefix, f"state.json cannot be read: {e}")
                continue
            if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
                continue
            if state.get("fingerprint") != self.fingerprint:
                print("ratatouille-trainer: warning: ignoring a checkpoint written for a different "
                      "job description", flush=True, file=__import__("sys").stderr)
                continue
            try:
                step = int(state["step"])
            except (KeyError, TypeError, ValueError):
                self._discard(prefix, "state.json has no step")
                continue
            if found is None or (step, prefix) > found[:2]:
                found = (step, prefix, state)
        if found is None:
            return None
        self.source = found[1]
        return found[2]

    def fetch_state_dict(self, dirname: str, name: str) -> dict[str, torch.Tensor]:
        local = os.path.join(self.tmp, dirname + "-" + name)
        self.storage.download(self._join(self.source or self.prefix, dirname, name), local)
        try:
            return load_safetensors_file(local)
        finally:
            os.unlink(local)

    def save(self, step: int, model_state: dict[str, torch.Tensor],
             opt_tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.guard()
        d = self.dirname(step)
        for name, tensors in ((CHECKPOINT_MODEL, model_state), (CHECKPOINT_OPTIMIZER, opt_tensors)):
            local = os.path.join(self.tmp, name)
            save_state_dict(tensors, local)
            self.storage.upload(local, self.uri(d, name))
            os.unlink(local)
        best_dir = (state.get("best") or {}).get("dir")
        if self.source is not None and best_dir and best_dir != d \
                and not self.storage.exists(self.uri(best_dir, CHECKPOINT_MODEL)):
            # resumed: the best step so far is in the earlier attempt's folder; copy its bytes
            local = os.path.join(self.tmp, "best.safetensors")
            self.storage.download(self._join(self.source, best_dir, CHECKPOINT_MODEL), local)
            self.storage.upload(local, self.uri(best_dir, CHECKPOINT_MODEL))
            os.unlink(local)
        self.guard()
        body = dict(state, version=CHECKPOINT_VERSION, fingerprint=self.fingerprint, latestDir=d)
        self.storage.write_json(self.uri(CHECKPOINT_STATE), body)
        self._prune({d, best_dir})

    def _prune(self, keep: set) -> None:
        try:
            dirs = set()
            for uri in self.storage.list(self.prefix):
                rel = uri[len(self.prefix):].lstrip("/")
                first = rel.split("/", 1)[0]
                if first.startswith("step-") and "/" in rel:
                    dirs.add(first)
            for old in sorted(dirs - keep):
                self.storage.delete_prefix(self.uri(old))
        except Exception as e:  # pruning is an optimisation: never fail training for it
            print(f"ratatouille-trainer: warning: could not prune old checkpoints: {e}",
                  file=__import__("sys").stderr, flush=True)

    def discard(self, why: str) -> None:
        """Drop the unreadable checkpoint load() found (the run starts over rather than failing
        every attempt)."""
        self._discard(self.source or self.prefix, why)

    def _discard(self, prefix: str, why: str) -> None:
        print(f"ratatouille-trainer: warning: discarding the unreadable checkpoint under "
              f"{prefix} ({why}); training starts from step 0", file=__import__("sys").stderr,
              flush=True)
        if prefix == self.source:
            self.source = None
        try:
            self.guard()
            if prefix == self.root:  # an older trainer's: its pointer is what makes it a checkpoint
                self.storage.delete(self._join(prefix, CHECKPOINT_STATE))
            else:
                self.storage.delete_prefix(prefix)
        except Exception:
            pass

    def clear(self) -> None:
        """Remove every attempt's checkpoints (the result is DONE: none is needed any more)."""
        try:
            self.storage.delete_prefix(self.root)
        except Exception:
            pass

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _rng_state() -> dict:
    st = {"torch": state_to_list(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = [state_to_list(s) for s in torch.cuda.get_rng_state_all()]
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(list_to_state(st["torch"]))
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all([list_to_state(s) for s in st["cuda"]])
        except Exception:
            pass


# ------------------------------------------------------------------------------------- loop

class BatchSource:
    """The training batches of the remaining steps, in order, and the time waited for them.

    On the CPU a batch (sampling + batched augmentation: many small tensor ops) is made with
    ``ctx.data_threads`` intra-op threads (1 from :func:`select_device`): with every core's
    OpenMP thread on those small ops they stall whenever the CPU is shared (measured on a loaded
    2-core machine: 586 ms vs 41 ms for a 96-image 32 px batch, 1.5 s vs 0.15 s at 64 px).

    When the process itself runs one intra-op thread (``OMP_NUM_THREADS=1``, as the operator's
    pods may), batch ``s+1`` is made in a background thread while step ``s`` runs, on another
    core. (With more threads it is made in the loop: a background thread cannot lower its own
    thread count without changing the process-wide OpenMP/MKL defaults the step uses.) The
    sampler and augmentation generators are only used by one thread, one batch after the other,
    so the batches are the same either way; :meth:`state` is the stream state *before* the next
    batch the loop will take, which is what a checkpoint records to resume exactly.

    On CUDA (``ctx.launch_ahead``) there is no thread: the loop calls :meth:`launch_next` after
    a step's backward and before it waits for that step's loss, so the next batch's sampling
    and augmentation are queued while the GPU still runs the step (on an H200, drawing and
    augmenting a 96-image batch at 224 px took 8.7 ms that the GPU otherwise sat out).
    """

    def __init__(self, stream: TrainStream, ctx: DeviceContext, remaining: int, *,
                 horizontal_flip: bool = True):
        self.stream = stream
        self.ctx = ctx
        self.horizontal_flip = bool(horizontal_flip)
        self.wait_seconds = 0.0
        self._pool = None
        self._pending = None
        self._ready = None                  # launch-ahead: (state before it, x, y)
        self._left = int(remaining)         # batches next() has still to give
        if (ctx.prefetch and not ctx.is_cuda and self._left > 0
                and torch.get_num_threads() == 1):
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ratatouille-batches")
            self._pending = self._pool.submit(self._make, True)

    @property
    def prefetching(self) -> bool:
        return self._pool is not None

    def _make(self, with_state: bool):
        state = self.stream.get_state() if with_state else None
        with self.ctx.data_scope():
            xb, yb = self.stream.next_raw()
            x = self.ctx.input(train_transform(self.ctx.to_device(xb), self.stream.aug_gen,
                                               horizontal_flip=self.horizontal_flip))
            y = self.ctx.to_device(yb)
        return state, x, y

    def launch_next(self) -> None:
        """Make the next batch now (CUDA, ``ctx.launch_ahead``); a no-op otherwise."""
        if self.ctx.launch_ahead and self._ready is None and self._pending is None and self._left > 0:
            self._ready = self._make(True)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        self._left -= 1
        if self._ready is not None:
            (_, x, y), self._ready = self._ready, None
        elif self._pending is None:
            _, x, y = self._make(False)
        else:
            _, x, y = self._pending.result()
            self._pending = self._pool.submit(self._make, True) if self._left > 0 else None
        self.wait_seconds += time.perf_counter() - t0
        return x, y

    def state(self) -> dict:
        if self._ready is not None:
            return self._ready[0]
        if self._pending is not None:
            return self._pending.result()[0]
        return self.stream.get_state()

    def close(self) -> None:
        if self._pool is not None:
            if self._pending is not None:
                self._pending.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
            self._pending = None
        self._ready = None


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]          # the kept model (best or last), CPU
    step: int                               # its step (0-based)
    score: ValScore
    curve: list[dict]
    steps: int
    images_per_second: float
    resumed_from: int | None = None
    train_seconds: float = 0.0
    data_wait_seconds: float = 0.0          # time the loop waited for batches (this session)


@dataclass
class _Loop:
    """What the training loop carries from step to step (and a checkpoint saves)."""
    opt: Any
    pidx: int = 0
    start: int = 0
    curve: list = field(default_factory=list)
    best: dict | None = None
    best_state: dict | None = None
    train_seconds: float = 0.0
    images_seen: int = 0
    resumed_from: int | None = None
    loss_sum: float = 0.0
    loss_n: int = 0
    last_score: ValScore | None = None

    def images_per_second(self) -> float:
        return self.images_seen / self.train_seconds if self.train_seconds > 0 else 0.0


def _resume(net, phases, stream, checkpointer, saved, keep) -> _Loop:
    """Load a checkpoint's model, optimizer, data stream and RNG states."""
    from .models import load_network_state

    last = int(saved["step"])
    model_state = checkpointer.fetch_state_dict(saved["latestDir"], CHECKPOINT_MODEL)
    load_network_state(net, model_state, "checkpoint model")
    pidx = int(saved["phase"])
    opt = make_optimizer(net, phases[pidx])
    opt_tensors = checkpointer.fetch_state_dict(saved["latestDir"], CHECKPOINT_OPTIMIZER)
    opt.load_state_dict(optimizer_from_flat(opt_tensors, saved["optimizer"]))
    stream.set_state(saved["stream"])
    _set_rng_state(saved["rng"])
    best = saved.get("best")
    best_state = None
    if best is not None and keep == "best":
        best_state = (model_state if best["dir"] == saved["latestDir"]
                      else checkpointer.fetch_state_dict(best["dir"], CHECKPOINT_MODEL))
    return _Loop(opt=opt, pidx=pidx, start=last + 1, curve=list(saved["curve"]), best=best,
                 best_state=best_state, train_seconds=float(saved.get("trainSeconds", 0.0)),
                 images_seen=int(saved.get("imagesSeen", 0)), resumed_from=last)


def _abort_at() -> int | None:
    v = os.environ.get("RATATOUILLE_ABORT_AT_STEP")
    return int(v) if v else None


def _start(net: Network, stream: TrainStream, phases: Sequence[Phase], checkpointer: Checkpointer | None,
           keep: str, seed: int) -> _Loop:
    """A fresh loop, or the one the newest readable checkpoint saved (an unreadable one is
    discarded and training starts over, as if there had been none)."""
    torch.manual_seed(seed)
    initial_state = cpu_state(net) if checkpointer is not None else None
    initial_stream = stream.get_state() if checkpointer is not None else None
    loop = _Loop(opt=make_optimizer(net, phases[0]))
    saved = checkpointer.load() if checkpointer is not None else None
    if saved is None:
        return loop
    try:
        return _resume(net, phases, stream, checkpointer, saved, keep)
    except (SimulatedCrash, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # truncated files, bad JSON fields, shapes that do not fit
        checkpointer.discard(f"{type(e).__name__}: {e}")
        torch.manual_seed(seed)  # as if there had been no checkpoint
        net.load_state_dict(initial_state)
        stream.set_state(initial_stream)
        return _Loop(opt=make_optimizer(net, phases[0]))


def _step(net: Network, fwd, loop: _Loop, phase: Phase, batches: "BatchSource", ctx: DeviceContext,
          step: int) -> float:
    """One optimizer step; returns its loss."""
    t0 = time.perf_counter()
    x, y = batches.next()
    with ctx.autocast():
        if phase.trainable == "head":
            with torch.no_grad():
                feats = net.features(x)
            logits = net.head(feats)
        else:
            logits = fwd(x)
    loss = F.cross_entropy(logits.float(), y)
    loop.opt.zero_grad(set_to_none=True)
    loss.backward()
    batches.launch_next()              # CUDA: queued behind this step's backward (see BatchSource)
    loss_v = float(loss.item())        # waits for the backward; the update below is not applied
    if not math.isfinite(loss_v):      # when the loss is not finite
        raise Diverged(f"the loss is {loss_v} at step {step} (lr {phase.lr:g}): lower the learning rate")
    loop.opt.step()
    loop.train_seconds += time.perf_counter() - t0
    loop.images_seen += int(y.shape[0])
    loop.loss_sum += loss_v
    loop.loss_n += 1
    return loss_v


def _evaluate(net: Network, loop: _Loop, evaluator: Evaluator, step: int, keep: str) -> tuple[ValScore, dict]:
    """Score the model, extend the curve, remember the best; returns (score, curve point)."""
    score = evaluator.score(net)
    loop.last_score = score
    point = {"step": step, "loss": loop.loss_sum / max(loop.loss_n, 1), "valAccuracy": score.mean,
             "valAccuracyPooled": score.pooled}
    loop.curve.append(point)
    loop.loss_sum, loop.loss_n = 0.0, 0
    if loop.best is None or score.mean > loop.best["score"]:
        loop.best = {"step": step, "score": score.mean, "pooled": score.pooled,
                     "perDomain": score.per_domain, "dir": Checkpointer.dirname(step)}
        if keep == "best":
            loop.best_state = cpu_state(net)
    return score, point


def _checkpoint(net: Network, loop: _Loop, checkpointer: Checkpointer, batches: "BatchSource", step: int,
                steps: int, keep: str) -> None:
    model_now = cpu_state(net)
    check_finite_state(model_now, f"the model after step {step}")  # never checkpointed
    opt_tensors, opt_meta = optimizer_to_flat(loop.opt)
    checkpointer.save(step, model_now, opt_tensors, {
        "step": step, "steps": steps, "phase": loop.pidx, "optimizer": opt_meta,
        "stream": batches.state(), "rng": _rng_state(), "curve": loop.curve,
        "best": loop.best if keep == "best" else None,
        "trainSeconds": loop.train_seconds, "imagesSeen": loop.images_seen,
    })


def _kept(net: Network, loop: _Loop, evaluator: Evaluator, steps: int, keep: str) -> tuple[dict, int, ValScore]:
    """(state, step, score) of the model the stage keeps: its best evaluation, or its last step."""
    if keep == "best":
        if loop.best_state is None:
            raise RuntimeError("no checkpoint was evaluated")
        best = loop.best
        return loop.best_state, int(best["step"]), ValScore(best["score"], best["pooled"], dict(best["perDomain"]))
    if loop.last_score is None:  # resumed right at the end
        loop.last_score = evaluator.score(net)
    return cpu_state(net), steps - 1, loop.last_score


def train(net: Network, stream: TrainStream, evaluator: Evaluator, *, steps: int, eval_every: int,
          phases: Sequence[Phase], ctx: DeviceContext, keep: str = "best",
          checkpointer: Checkpointer | None = None, progress=None, seed: int = 0,
          on_eval: Callable[[int, ValScore], None] | None = None,
          horizontal_flip: bool = True) -> TrainResult:
    """Run steps 0..steps-1 (or continue from a checkpoint) and return the kept model.

    ``horizontal_flip``: the job description's ``augmentation.horizontalFlip``.

    ``keep="best"``: the checkpoint with the best ``ValScore.mean`` (strict ``>``, so ties keep
    the earlier step); ``keep="last"``: the last step's model.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if keep not in ("best", "last"):
        raise ValueError(keep)
    phases = sorted(phases, key=lambda p: p.start)
    if not phases or phases[0].start != 0:
        raise ValueError("the first phase must start at step 0")
    ctx.prepare(net)
    stream.to(ctx.device, pin=ctx.pin_memory, max_device_bytes=ctx.device_cache_bytes)
    fwd = ctx.compiled(net)
    loop = _start(net, stream, phases, checkpointer, keep, seed)
    if loop.resumed_from is not None and progress is not None:
        progress.emit("resume", step=loop.start, steps=steps)

    abort_at = _abort_at()
    net.train()
    batches = BatchSource(stream, ctx, steps - loop.start, horizontal_flip=horizontal_flip)
    try:
        for step in range(loop.start, steps):
            # phase switch: a fresh Adam over the new phase's parameters (reference: head warm-up)
            new_idx = phase_index(phases, step)
            if new_idx != loop.pidx:
                loop.opt = make_optimizer(net, phases[new_idx])
                loop.pidx = new_idx
            loss_v = _step(net, fwd, loop, phases[loop.pidx], batches, ctx, step)
            if (eval_every > 0 and step % eval_every == 0) or step == steps - 1:
                score, point = _evaluate(net, loop, evaluator, step, keep)
                if on_eval is not None:
                    on_eval(step, score)
                if checkpointer is not None:
                    _checkpoint(net, loop, checkpointer, batches, step, steps, keep)
                if progress is not None:
                    progress.update(step + 1, loss=point["loss"], val=score.mean,
                                    images_per_second=loop.images_per_second())
            elif progress is not None:
                progress.update(step + 1, loss=loss_v, images_per_second=loop.images_per_second())
            if abort_at is not None and step + 1 >= abort_at:
                raise SimulatedCrash(f"aborted after step {step} (RATATOUILLE_ABORT_AT_STEP={abort_at})")
    finally:
        batches.close()

    state, kept_step, kept_score = _kept(net, loop, evaluator, steps, keep)
    check_finite_state(state, f"the kept model (step {kept_step})")
    for p in net.parameters():
        p.requires_grad_(True)
    return TrainResult(state=state, step=kept_step, score=kept_score, curve=loop.curve, steps=steps,
                       images_per_second=loop.images_per_second(), resumed_from=loop.resumed_from,
                       train_seconds=loop.train_seconds, data_wait_seconds=batches.wait_seconds)
