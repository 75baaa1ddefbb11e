"""Prepared datasets: listed, decoded and resized once, cached in storage, memory-mapped by every Job.

The ``prepare`` stage turns a DomainBed-layout dataset into a cache entry

    <storage.uri>/cache/data/<key>/
      index.json          classes, domains (image ranges, files skipped and why), shards, listing
      labels.npy          int64 [N] (numpy format, read with allow_pickle=False)
      shard-00000.u8 ...  uint8 images [n, 3, S, S], raw (no header): a few large files
      DONE                written last, with the shards' sha256

and writes ``prepared.json`` (which entry this run uses) under its own output. ``<key>`` hashes
the dataset's listing (every object's path, size and ETag or mtime), ``inputSize`` and
:data:`PREP_VERSION`: changing an image, the resolution or this code's format makes a new entry,
and every run and seed that needs the same data reuses the same one (a ``prepare`` Job then only
lists the dataset and finds ``DONE``).

Images are stored in the order :func:`data.load_dataset` gives them (domains sorted, classes
sorted, files sorted, unreadable ones left out), so the in/out split, the batches and the
augmentation of a run on a prepared entry are bit-identical to decoding the dataset in the Job.
Shards never span two domains.

Reading (:func:`load_prepared`): the shards are copied once to the pod's local disk (one GET each,
checked against the sha256 that ``DONE`` records) and memory-mapped. When the training domains'
in-splits fit in the memory budget (``data.memoryBudget``, ``RATATOUILLE_MEMORY_BUDGET``,
default 8 GiB), the dataset is used exactly like the in-memory one. Above it, images are read on
demand from short-lived mappings of the shards (evaluation in slices, training from
:class:`WindowStream`), so memory stays bounded by the budget whatever the dataset's size.

Nothing here unpickles: shards are raw bytes, labels a plain integer array, the index JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from ratatouille_contract.jobdesc import JobDescriptionError
from ratatouille_contract.layout import METRICS, join

from .data import (DataError, Domain, DomainDataset, TrainStream, _check_args, _gen, _warn,
                   check_dataset, check_test_domains, decode_files, decode_workers, list_dataset,
                   make_domain, resolve_dataset, seed_hash)

PREP_VERSION = 1
INDEX = "index.json"
LABELS = "labels.npy"
POINTER = "prepared.json"
DEFAULT_SHARD_BYTES = 2 << 30
DEFAULT_MEMORY_BUDGET = 8 << 30
_DECODE_CHUNK = 1024

_UNITS = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12,
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
_BYTES_RE = re.compile(r"^\s*([0-9]+)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int, what: str = "memoryBudget") -> int:
    """``"8Gi"``, ``"512Mi"``, ``"2G"`` or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _BYTES_RE.match(str(text))
    if not m:
        raise DataError(f"{what}: not a size in bytes (like 8Gi or 512Mi): {text!r}")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").lower()]


def memory_budget(value: str | None = None) -> int:
    """The spec's value, else ``RATATOUILLE_MEMORY_BUDGET``, else 8 GiB."""
    if value:
        return parse_bytes(value)
    env = os.environ.get("RATATOUILLE_MEMORY_BUDGET")
    return parse_bytes(env, "RATATOUILLE_MEMORY_BUDGET") if env else DEFAULT_MEMORY_BUDGET


def _visible(rel: str) -> bool:
    return not any(part.startswith(".") for part in rel.split("/"))


def dataset_entries(storage, uri: str) -> list[tuple[str, int, str]]:
    """(relative path, size, ETag or mtime) of every visible object of the dataset, sorted."""
    from .storage import NotFound

    try:
        entries = storage.entries(uri)
    except NotFound:
        entries = []
    entries = [e for e in entries if _visible(e[0])]
    if not entries:
        raise DataError(f"dataset {uri} not found (no objects under that prefix)")
    return entries


def cache_key(entries: Sequence[tuple[str, int, str]], input_size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": PREP_VERSION, "inputSize": int(input_size)}, sort_keys=True).encode())
    for rel, size, etag in entries:
        h.update(f"\n{rel}\t{size}\t{etag}".encode())
    return h.hexdigest()[:20]


# ------------------------------------------------------------------------------------ prepare


class _ShardWriter:
    def __init__(self, directory: str, row_bytes: int, shard_bytes: int):
        self.dir = directory
        self.row_bytes = row_bytes
        self.rows_per_shard = max(1, shard_bytes // row_bytes)
        self.shards: list[dict] = []
        self._fh = None
        self._hash = None
        self.count = 0

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self.shards[-1]["bytes"] = self.shards[-1]["count"] * self.row_bytes
            self._fh = None

    def new_shard(self) -> None:
        self._close()
        name = f"shard-{len(self.shards):05d}.u8"
        self.shards.append({"file": name, "start": self.count, "count": 0})
        self._fh = open(os.path.join(self.dir, name), "wb")
        self._hash = hashlib.sha256()

    def write(self, arrays: Sequence[np.ndarray]) -> None:
        for a in arrays:
            if self._fh is None or self.shards[-1]["count"] >= self.rows_per_shard:
                self.new_shard()
            row = np.ascontiguousarray(a.transpose(2, 0, 1)).tobytes()  # HWC -> CHW, as in memory
            self._fh.write(row)
            self._hash.update(row)
            self.shards[-1]["count"] += 1
            self.count += 1

    def finish(self) -> list[dict]:
        self._close()
        return [s for s in self.shards if s["count"]]


def prepare_dataset(uri: str, input_size: int, cache_root: str, *, storage, endpoint: str | None = None,
                    workers: int | None = None, shard_bytes: int | None = None,
                    progress=None) -> dict:
    """Make sure the cache entry for ``uri`` at ``input_size`` exists; returns what
    ``prepared.json`` records (``reused`` says whether it was already there)."""
    _check_args(input_size, 0.0)
    t0 = time.monotonic()
    entries = dataset_entries(storage, uri)
    key = cache_key(entries, input_size)
    entry = join(cache_root, key)
    info = {"version": PREP_VERSION, "key": key, "entry": entry, "dataset": uri,
            "inputSize": int(input_size), "objects": len(entries),
            "objectBytes": sum(e[1] for e in entries)}
    if storage.is_done(entry):
        return {**info, "reused": True, "seconds": time.monotonic() - t0}
    shard_bytes = shard_bytes or int(os.environ.get("RATATOUILLE_SHARD_BYTES", DEFAULT_SHARD_BYTES))
    root = resolve_dataset(uri, endpoint)
    listing = list_dataset(uri, root)
    row_bytes = 3 * input_size * input_size
    tmp = tempfile.mkdtemp(prefix="ratatouille-prepare-")
    try:
        writer = _ShardWriter(tmp, row_bytes, shard_bytes)
        labels: list[int] = []
        domains = []
        total = sum(len(f) for _, f in listing.domains)
        done = 0
        with ThreadPoolExecutor(max_workers=decode_workers(workers)) as pool:
            for name, files in listing.domains:
                start = writer.count
                writer.new_shard()  # shards never span two domains
                skipped = list(listing.walk_skipped.get(name, []))
                for i in range(0, len(files), _DECODE_CHUNK):
                    arrays, lab, skip = decode_files(files[i:i + _DECODE_CHUNK], input_size, root, pool)
                    writer.write(arrays)
                    labels.extend(lab)
                    skipped.extend(skip)
                    done += len(files[i:i + _DECODE_CHUNK])
                    if progress is not None:
                        progress(done, total)
                for s in skipped:
                    _warn(f"skipping image {s}")
                domains.append({"name": name, "start": start, "count": writer.count - start,
                                "files": len(files), "skipped": skipped})
        shards = writer.finish()
        np.save(os.path.join(tmp, LABELS), np.asarray(labels, dtype=np.int64), allow_pickle=False)
        index = {**info, "classes": listing.classes, "imageShape": [3, input_size, input_size],
                 "dtype": "uint8", "count": writer.count, "domains": domains, "shards": shards,
                 "labels": LABELS, "labelsSha256": _sha256_file(os.path.join(tmp, LABELS))}
        for s in shards:
            storage.upload(os.path.join(tmp, s["file"]), join(entry, s["file"]))
        storage.upload(os.path.join(tmp, LABELS), join(entry, LABELS))
        storage.write_text(join(entry, INDEX), json.dumps(index, indent=1, sort_keys=True) + "\n")
        storage.mark_done(entry, {"key": key, "version": PREP_VERSION, "count": writer.count,
                                  "shards": {s["file"]: s["sha256"] for s in shards},
                                  "labelsSha256": index["labelsSha256"]},
                          require=[INDEX, LABELS] + [s["file"] for s in shards])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**info, "reused": False, "images": writer.count, "shards": len(shards),
            "skippedImages": sum(len(d["skipped"]) for d in domains),
            "seconds": time.monotonic() - t0}


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ reading


def _local_entry(storage, entry: str, index: dict) -> str:
    """A local directory holding the entry's files: the entry itself on ``file://``, else a copy
    under the local cache (one GET per file, verified against DONE's sha256 once)."""
    from .storage import local_cache_dir, split_uri

    scheme, root, key = split_uri(entry)
    names = [s["file"] for s in index["shards"]] + [LABELS]
    if scheme == "file":
        return os.path.join(root, key)
    done = storage.read_done(entry) or {}
    want = dict(done.get("shards") or {})
    want[LABELS] = done.get("labelsSha256")
    local = os.path.join(local_cache_dir(), "data", index["key"])
    os.makedirs(local, exist_ok=True)
    for name in names:
        path = os.path.join(local, name)
        ok = path + ".verified"
        if os.path.exists(path) and os.path.exists(ok):
            continue
        storage.download(join(entry, name), path)
        if want.get(name) and _sha256_file(path) != want[name]:
            os.unlink(path)
            raise DataError(f"prepared dataset {entry}: {name} does not match the sha256 its DONE records")
        open(ok, "w").close()
    return local


class LazyImages:
    """uint8 images [N, 3, S, S] read on demand from shard files (mapped per read and unmapped
    after it; the page cache is not this process's memory). Slicing returns a tensor; indexing
    with a tensor of indices returns another :class:`LazyImages` (nothing is read until it is
    sliced)."""

    def __init__(self, chunks: Sequence[tuple[str, int]], shape: tuple[int, int, int],
                 idx: np.ndarray | None = None):
        self.chunks = list(chunks)          # (path, rows) in order
        self.row_shape = tuple(shape)
        self.row_bytes = int(np.prod(shape))
        self.starts = np.cumsum([0] + [n for _, n in self.chunks], dtype=np.int64)[:-1]
        total = sum(n for _, n in self.chunks)
        self.idx = np.arange(total, dtype=np.int64) if idx is None else np.asarray(idx, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.idx),) + self.row_shape

    def __len__(self) -> int:
        return len(self.idx)

    def numel(self) -> int:
        return len(self.idx) * self.row_bytes

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows (global indices) into a new array. Each shard's rows are gathered in file order by
        one vectorised copy from a mapping of that shard, unmapped right after, so the pages it
        touched leave this process's RSS (a Python loop of one ``pread`` per row cost a streamed
        window refill several milliseconds of the training thread's GIL)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows),) + self.row_shape, dtype=np.uint8)
        chunk_of = np.searchsorted(self.starts, rows, side="right") - 1
        for c in np.unique(chunk_of).tolist():
            where = np.flatnonzero(chunk_of == c)
            local = rows[where] - self.starts[c]
            order = np.argsort(local, kind="stable")
            path, n = self.chunks[c]
            if local.size and (local.min() < 0 or local.max() >= n):
                raise DataError(f"{path}: row {int(local.max())} is outside the shard's {n} rows")
            try:
                mm = np.memmap(path, dtype=np.uint8, mode="r", shape=(n,) + self.row_shape)
            except (ValueError, OSError) as e:
                raise DataError(f"{path}: shard shorter than its index says ({e})") from None
            out[where[order]] = mm[local[order]]   # a copy: dropping mm unmaps the shard
            del mm
        return out

    def __getitem__(self, key):
        if isinstance(key, slice):
            return torch.from_numpy(self.read_rows(self.idx[key]))
        if torch.is_tensor(key):
            key = key.cpu().numpy()
        return LazyImages(self.chunks, self.row_shape, self.idx[np.asarray(key, dtype=np.int64)])

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self[:].to(*args, **kwargs)


def _memmap_tensor(chunks: Sequence[tuple[str, int]], shape: tuple[int, int, int]) -> torch.Tensor:
    parts = [torch.from_numpy(np.memmap(p, dtype=np.uint8, mode="c", shape=(n,) + tuple(shape)))
             for p, n in chunks if n]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def read_pointer(storage, uri: str) -> dict:
    """The ``prepared.json`` under a prepare member's output (or the entry itself)."""
    pointer = storage.read_json(join(uri, POINTER)) if storage.exists(join(uri, POINTER)) else None
    if pointer is None:
        if not storage.is_done(uri):
            raise DataError(f"prepared dataset {uri}: neither {POINTER} nor a complete cache entry")
        pointer = {"entry": uri}
    return pointer


def load_prepared(uri: str, *, test_domains: Sequence[str] = (), holdout_fraction: float = 0.2,
                  split_seed: int = 0, storage=None, endpoint: str | None = None,
                  budget: int | None = None, expect_dataset: str | None = None,
                  expect_input_size: int | None = None) -> DomainDataset:
    """The dataset of a prepared entry (``uri``: a prepare member's output or the entry)."""
    from .storage import open_storage

    storage = storage or open_storage(uri, endpoint)
    pointer = read_pointer(storage, uri)
    entry = pointer["entry"]
    if not storage.is_done(entry):
        raise DataError(f"prepared dataset {entry} is not complete (no DONE)")
    index = storage.read_json(join(entry, INDEX))
    if index.get("version") != PREP_VERSION:
        raise DataError(f"prepared dataset {entry}: format version {index.get('version')}, this trainer "
                        f"reads {PREP_VERSION}")
    if expect_dataset and index.get("dataset") != expect_dataset:
        raise DataError(f"prepared dataset {entry} holds {index.get('dataset')}, not {expect_dataset}")
    size = int(index["inputSize"])
    if expect_input_size and size != int(expect_input_size):
        raise DataError(f"prepared dataset {entry} is at inputSize {size}, not {expect_input_size}")
    _check_args(size, holdout_fraction)
    local = _local_entry(storage, entry, index)
    labels_all = np.load(os.path.join(local, LABELS), allow_pickle=False)
    if labels_all.dtype != np.int64 or labels_all.shape != (int(index["count"]),):
        raise DataError(f"prepared dataset {entry}: labels do not match the index")
    names = [d["name"] for d in index["domains"]]
    uri_name = index["dataset"]
    check_test_domains(uri_name, names, test_domains)
    shape = (3, size, size)
    row_bytes = 3 * size * size
    budget = memory_budget() if budget is None else int(budget)
    train_bytes = sum((d["count"] - int(d["count"] * holdout_fraction)) * row_bytes
                      for d in index["domains"] if d["name"] not in test_domains)
    streamed = train_bytes > budget
    domains: list[Domain] = []
    for di, d in enumerate(index["domains"]):
        if d["files"] == 0:
            raise DataError(f"domain {d['name']!r} of dataset {uri_name} has no images")
        lo, hi = d["start"], d["start"] + d["count"]
        chunks = []
        for s in index["shards"]:
            a, b = max(lo, s["start"]), min(hi, s["start"] + s["count"])
            if a < b:
                if (a, b) != (s["start"], s["start"] + s["count"]):
                    raise DataError(f"prepared dataset {entry}: a shard spans two domains")
                chunks.append((os.path.join(local, s["file"]), b - a))
        images = (LazyImages(chunks, shape) if streamed
                  else _memmap_tensor(chunks, shape) if chunks
                  else torch.empty((0,) + shape, dtype=torch.uint8))
        labels = torch.from_numpy(labels_all[lo:hi].copy())
        domains.append(make_domain(uri_name, d["name"], di, images, labels, d["skipped"],
                                   holdout_fraction, split_seed))
    ds = DomainDataset(uri=uri_name, root=local, classes=list(index["classes"]), domains=domains,
                       input_size=size, test_domains=tuple(test_domains))
    ds.prepared = {"entry": entry, "key": index["key"], "version": PREP_VERSION,
                   "images": int(index["count"]), "shards": len(index["shards"]),
                   "streamed": streamed, "memoryBudget": budget, "trainingBytes": train_bytes}
    if streamed:
        ds.window_bytes = budget
    return check_dataset(ds, holdout_fraction)


# ------------------------------------------------------------------------------ bounded sampling


@dataclass
class _Window:
    key: tuple[int, int]
    images: torch.Tensor
    labels: torch.Tensor


class WindowStream(TrainStream):
    """Training batches when the training domains do not fit in memory.

    Each training domain's in-split is cut into windows of ``W`` images (``W`` from the memory
    budget: two windows per domain, the current one and the next being read, fit in it). Epoch
    ``e`` of a domain visits its windows in the order of a permutation of the in-split seeded by
    ``(seed, domain, e)``; a window serves ``W // batchSize`` steps, each drawing ``batchSize``
    images with replacement from the window (the same per-domain generators as
    :class:`data.TrainStream`), then the next window is read (in the background) and replaces it.

    How this differs from DomainBed (draws with replacement from the whole in-split at every
    step): within a window a batch only sees those ``W`` images, and over an epoch each image is
    drawn about once (a shuffle buffer rather than independent draws), the way streaming
    loaders (WebDataset, tf.data shuffle buffers) sample. The per-image probabilities over a
    whole epoch are the same; what changes is that consecutive batches are correlated within a
    window. With data that fits, :class:`data.TrainStream` keeps DomainBed's exact sampling.

    The state (for checkpoints) is the generators' states and the step count: the window a step
    uses follows from the step, so a resumed run reads the same windows and draws the same
    batches.
    """

    def __init__(self, dataset: DomainDataset, batch_size: int, seed: int, *, budget: int | None = None,
                 augment: bool = True):
        self.domains = dataset.train_domains
        self.batch_size = int(batch_size)
        self.augment = augment
        self.seed = int(seed)
        self.samplers = [_gen(seed_hash(seed, "sampler", d.index)) for d in self.domains]
        self.aug_gen = _gen(seed_hash(seed, "augment"))
        budget = int(budget or getattr(dataset, "window_bytes", 0) or memory_budget())
        row = 3 * dataset.input_size * dataset.input_size
        per_domain = max(self.batch_size, budget // (2 * len(self.domains) * row))
        self.window = [min(per_domain, len(d.in_idx)) for d in self.domains]
        self.steps_per_window = [max(1, w // self.batch_size) for w in self.window]
        self.step = 0
        self._current: list[_Window | None] = [None] * len(self.domains)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ratatouille-window")
        self._next: list = [None] * len(self.domains)
        self.device = torch.device("cpu")

    def to(self, device: torch.device, pin: bool = False, max_device_bytes: int = 0) -> "WindowStream":
        self.device = torch.device(device) if device is not None else self.device
        return self

    def _window_key(self, k: int, step: int) -> tuple[int, int]:
        w = step // self.steps_per_window[k]
        n_windows = -(-len(self.domains[k].in_idx) // self.window[k])
        return (w // n_windows, w % n_windows)

    def _load(self, k: int, key: tuple[int, int]) -> _Window:
        d = self.domains[k]
        epoch, pos = key
        n = len(d.in_idx)
        perm = np.random.RandomState(seed_hash(self.seed, "window", d.index, epoch)).permutation(n)
        rows = d.in_idx.numpy()[perm[pos * self.window[k]:(pos + 1) * self.window[k]]]
        if isinstance(d.images, LazyImages):
            images = torch.from_numpy(d.images.read_rows(d.images.idx[rows]))
        else:
            images = d.images[torch.from_numpy(rows)]
        return _Window(key, images, d.labels[torch.from_numpy(rows)])

    def _window(self, k: int) -> _Window:
        key = self._window_key(k, self.step)
        cur = self._current[k]
        if cur is not None and cur.key == key:
            return cur
        fut = self._next[k]
        win = fut.result() if fut is not None and fut.key == key else self._load(k, key)
        self._current[k] = win
        nxt = self._window_key(k, (self.step // self.steps_per_window[k] + 1) * self.steps_per_window[k])
        f = self._pool.submit(self._load, k, nxt)
        f.key = nxt
        self._next[k] = f
        return win

    def next_raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for k, g in enumerate(self.samplers):
            win = self._window(k)
            idx = torch.randint(len(win.labels), (self.batch_size,), generator=g)
            xs.append(win.images[idx])
            ys.append(win.labels[idx])
        self.step += 1
        x, y = torch.cat(xs), torch.cat(ys)
        if self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def get_state(self) -> dict:
        return {**super().get_state(), "windowStep": self.step}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.step = int(state.get("windowStep", 0))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def run_prepare(desc, ctx=None, progress=None) -> dict:
    """The ``prepare`` stage: make sure the cache entry exists (under ``data.prepared``, the
    cache root), then write ``prepared.json`` (which entry), ``metrics.json`` and ``DONE``
    under the member's output."""
    from . import __version__
    from .progress import Progress
    from .storage import open_storage

    if not desc.data.prepared:
        raise JobDescriptionError("prepare stage needs data.prepared (the root of the cache entries)")
    storage = open_storage(desc.output, desc.storage_endpoint)
    progress = progress or Progress(desc.stage, desc.member, 0)

    def report(done: int, total: int) -> None:
        progress.emit(step=done, steps=total, time=round(time.time(), 3))

    info = prepare_dataset(desc.data.dataset, int(desc.foundation.inputSize), desc.data.prepared,
                           storage=storage, endpoint=desc.storage_endpoint, progress=report)
    storage.write_json(join(desc.output, POINTER), info)
    metrics = {"stage": desc.stage, "member": desc.member, "prepared": info, "reused": info["reused"],
               "run": {"namespace": desc.run.namespace, "name": desc.run.name, "uid": desc.run.uid},
               "trainerVersion": __version__}
    storage.write_json(join(desc.output, METRICS), metrics)
    storage.mark_done(desc.output, {"stage": desc.stage, "member": desc.member, "key": info["key"]},
                      require=(POINTER, METRICS))
    progress.emit("done", reused=info["reused"], key=info["key"])
    return metrics


def train_stream(dataset: DomainDataset, batch_size: int, seed: int):
    """:class:`data.TrainStream` (DomainBed's exact sampling) for data that fits in memory,
    :class:`WindowStream` for a prepared dataset above its memory budget."""
    from .data import TrainStream

    if getattr(dataset, "window_bytes", None):
        return WindowStream(dataset, batch_size, seed)
    return TrainStream(dataset, batch_size, seed)
