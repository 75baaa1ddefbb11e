"""DomainBed-layout datasets: ``<domain>/<class>/<image>``, decoded once into memory.

The protocol is DomainBed's as the Model Ratatouille reference runs it (docs/algorithm.md):
- domains sorted by name, classes the sorted class folders (identical in every domain);
- each domain split into an "out" (validation) part of ``int(len * holdoutFraction)`` images
  and an "in" (training) part, with ``numpy.random.RandomState(seed_hash(splitSeed, domain
  index)).shuffle`` exactly as DomainBed's ``misc.split_dataset``;
- every training step draws ``batchSize`` images *with replacement* from the in-split of every
  training domain (DomainBed's InfiniteDataLoader) and concatenates them;
- training augmentation RandomResizedCrop(scale 0.7-1), horizontal flip (``spec.augmentation.
  horizontalFlip``, on by default; DomainBed does not flip digits), ColorJitter(0.3 x4),
  RandomGrayscale(p=0.1); evaluation is resize only; ImageNet normalization.

Images are decoded once (any PIL-readable format and mode, converted to RGB and resized to
``inputSize`` x ``inputSize``) into one uint8 tensor per domain, so training is not I/O bound.
Augmentation runs batched on tensors with per-image random parameters drawn from an explicit
``torch.Generator`` whose state is checkpointed, so a resumed run draws the same batches.
"""
from __future__ import annotations

import hashlib
import math
import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """The dataset cannot be used as described; the message names the dataset/domain/file."""


def seed_hash(*args) -> int:
    """DomainBed's ``misc.seed_hash``: an integer seed derived from the repr of the arguments."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2 ** 31)


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """DomainBed's ``misc.split_dataset``: (out, in) index lists; ``out`` has
    ``int(n * holdout_fraction)`` entries."""
    n_out = int(n * holdout_fraction)
    keys = list(range(n))
    np.random.RandomState(seed).shuffle(keys)
    return keys[:n_out], keys[n_out:]


@dataclass
class Domain:
    name: str
    index: int                      # position among all (sorted) domains
    images: torch.Tensor            # uint8 [N, 3, S, S]
    labels: torch.Tensor            # int64 [N]
    out_idx: torch.Tensor           # int64 indices of the validation ("out") split
    in_idx: torch.Tensor            # int64 indices of the training ("in") split
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if which == "full":
            return self.images, self.labels
        idx = self.out_idx if which == "out" else self.in_idx
        return self.images[idx], self.labels[idx]


@dataclass
class DomainDataset:
    uri: str
    root: str
    classes: list[str]
    domains: list[Domain]
    input_size: int
    test_domains: tuple[str, ...] = ()
    prepared: dict | None = None        # the prepared cache entry it was read from (lineage)
    window_bytes: int | None = None     # set when training must stream (over the memory budget)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def domain(self, name: str) -> Domain:
        for d in self.domains:
            if d.name == name:
                return d
        raise DataError(f"dataset {self.uri}: no domain {name!r} (available: {', '.join(self.domain_names)})")

    @property
    def train_domains(self) -> list[Domain]:
        return [d for d in self.domains if d.name not in self.test_domains]

    @property
    def test_domain_list(self) -> list[Domain]:
        return [self.domain(n) for n in self.test_domains]

    def validation_sets(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """The training domains' out splits (training-domain validation), non-empty ones."""
        out = []
        for d in self.train_domains:
            x, y = d.split("out")
            if len(y):
                out.append((d.name, x, y))
        return out


# ------------------------------------------------------------------------------------ reading

def _warn(msg: str) -> None:
    print(f"ratatouille-trainer: warning: {msg}", file=sys.stderr, flush=True)


def resolve_dataset(uri: str, endpoint: str | None = None) -> str:
    """A local directory holding the dataset: the path itself for plain paths and ``file://``,
    a synced local cache for ``s3://``."""
    if uri.startswith("s3://"):
        from . import storage as st
        try:
            s = st.open_storage(uri, endpoint)
            if not s.list(uri):
                raise DataError(f"dataset {uri} not found (no objects under that prefix)")
            return s.sync_to_local(uri)
        except st.NotFound:
            raise DataError(f"dataset {uri} not found") from None
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if not os.path.isdir(path):
        raise DataError(f"dataset {uri} not found (no such directory)")
    return path


def _real_root(root: str) -> str:
    return os.path.realpath(root)


def _inside(path: str, real_root: str) -> bool:
    """``path`` resolves (symlinks followed) to ``real_root`` or below it."""
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _visible_dirs(path: str, real_root: str | None = None) -> list[str]:
    """Sorted visible sub-directories of ``path``; with ``real_root``, only those that resolve
    inside it (a link to a directory elsewhere is ignored with a warning)."""
    try:
        names = os.listdir(path)
    except OSError as e:
        raise DataError(f"cannot list {path}: {e.strerror}") from None
    out = []
    for n in sorted(names):
        full = os.path.join(path, n)
        if n.startswith(".") or not os.path.isdir(full):
            continue
        if real_root is not None and not _inside(full, real_root):
            _warn(f"ignoring {full}: it leads outside the dataset root")
            continue
        out.append(n)
    return out


def _class_files(class_dir: str, real_root: str | None = None,
                 skipped: list[str] | None = None) -> list[str]:
    """The regular files under ``class_dir`` (sorted, hidden names ignored). Symbolic links are
    followed only while they stay inside the dataset root (``real_root``, resolved) for files,
    inside the class folder itself for directories (a directory link elsewhere would copy other
    classes into this one), and every directory is entered once (no loops); named pipes,
    sockets and devices are never opened (opening a FIFO blocks forever). What is left out is
    appended to ``skipped`` with why."""
    real_root = real_root or _real_root(class_dir)
    real_class = _real_root(class_dir)
    files: list[str] = []
    seen: set[tuple[int, int]] = set()

    def note(path: str, why: str) -> None:
        if skipped is not None:
            skipped.append(f"{path} ({why})")

    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            note(dirpath, "directory already visited: symbolic link loop")
            continue
        seen.add((st.st_dev, st.st_ino))
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if not _inside(os.path.join(dirpath, d), real_class):
                note(os.path.join(dirpath, d), "leads outside the dataset root"
                     if not _inside(os.path.join(dirpath, d), real_root) else "leads outside its class folder")
                continue
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            full = os.path.join(dirpath, f)
            if not _inside(full, real_root):
                note(full, "leads outside the dataset root")
                continue
            try:
                mode = os.stat(full).st_mode
            except OSError as e:
                note(full, f"cannot stat: {e.strerror}")
                continue
            if not stat.S_ISREG(mode):
                note(full, "not a regular file")
                continue
            files.append(full)
    return files


# Images larger than this are refused from their header, before any pixel is decoded: the
# decoder would otherwise allocate width x height x channels bytes (PIL only refuses above
# about 179 Mpx). The cap grows with inputSize and never exceeds PIL's own warning threshold.
_MIN_PIXEL_CAP = 40_000_000
_PIL_WARNING_PIXELS = 89_478_485


def max_image_pixels(size: int) -> int:
    """The pixel cap for ``inputSize`` ``size``: ``RATATOUILLE_MAX_IMAGE_PIXELS`` if set, else
    ``max(40 Mpx, 512 * size**2)`` capped at PIL's warning threshold (89.5 Mpx)."""
    env = os.environ.get("RATATOUILLE_MAX_IMAGE_PIXELS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise DataError(f"RATATOUILLE_MAX_IMAGE_PIXELS={env!r}: not an integer") from None
    return min(_PIL_WARNING_PIXELS, max(_MIN_PIXEL_CAP, 512 * size * size))


class ImageTooLarge(ValueError):
    pass


def decode_image(path: str, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode any PIL-readable image to RGB uint8 [size, size, 3] (resize like torchvision's
    ``Resize((size, size))`` on PIL images: bilinear with antialiasing). Raises on bad files,
    and (:class:`ImageTooLarge`, from the header alone) on images above ``max_pixels``
    (default :func:`max_image_pixels`)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        cap = max_pixels if max_pixels is not None else max_image_pixels(size)
        if w * h > cap:
            raise ImageTooLarge(f"{w}x{h} is {w * h / 1e6:.1f} Mpx, above the cap of "
                                f"{cap / 1e6:.1f} Mpx for inputSize {size}; not decoded")
        im.load()
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            # composite on black like convert("RGB") would drop alpha; keep it simple & stable
            im = im.convert("RGBA").convert("RGB")
        elif im.mode != "RGB":
            im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"unexpected decoded shape {arr.shape}")
    return arr


def _try_decode(args: tuple[str, int]) -> np.ndarray | str:
    path, size = args
    try:
        return decode_image(path, size)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{type(e).__name__}: {e}"


@dataclass
class Listing:
    """What a dataset holds, before decoding: domains (sorted) with their ``(file, class
    index)`` pairs in the order images get, and the entries left out while walking (why)."""
    uri: str
    root: str
    classes: list[str]
    domains: list[tuple[str, list[tuple[str, int]]]]
    walk_skipped: dict[str, list[str]] = field(default_factory=dict)


def _check_args(input_size: int, holdout_fraction: float) -> None:
    if not (0.0 <= holdout_fraction < 1.0):
        raise DataError(f"holdoutFraction must be in [0, 1), got {holdout_fraction}")
    if input_size < 8:
        raise DataError(f"inputSize must be at least 8, got {input_size}")


def check_test_domains(uri: str, names: Sequence[str], test_domains: Sequence[str]) -> None:
    missing = [t for t in test_domains if t not in names]
    if missing:
        raise DataError(f"test domain {missing[0]!r} is not in dataset {uri} (available: {', '.join(names)})")
    if len(set(test_domains)) >= len(names):
        raise DataError(f"dataset {uri}: every domain is a test domain; nothing left to train on")


def list_dataset(uri: str, root: str, test_domains: Sequence[str] = ()) -> Listing:
    """Walk a local DomainBed-layout directory (see :func:`_class_files` for what is left out)."""
    real_root = _real_root(root)
    names = _visible_dirs(root, real_root)
    if not names:
        raise DataError(f"dataset {uri} has no domain folders (expected <domain>/<class>/<image>)")
    check_test_domains(uri, names, test_domains)
    classes: list[str] | None = None
    listing = Listing(uri=uri, root=root, classes=[], domains=[])
    for name in names:
        dclasses = _visible_dirs(os.path.join(root, name), real_root)
        if not dclasses:
            raise DataError(f"domain {name!r} of dataset {uri} has no class folders")
        if classes is None:
            classes = dclasses
        elif dclasses != classes:
            extra = sorted(set(dclasses) - set(classes))
            lacking = sorted(set(classes) - set(dclasses))
            what = []
            if extra:
                what.append(f"extra classes {extra}")
            if lacking:
                what.append(f"missing classes {lacking}")
            raise DataError(f"domain {name!r} of dataset {uri} has different classes than "
                            f"domain {names[0]!r}: {'; '.join(what)}")
        files: list[tuple[str, int]] = []
        walk_skipped: list[str] = []
        for ci, c in enumerate(dclasses):
            files.extend((f, ci) for f in _class_files(os.path.join(root, name, c), real_root, walk_skipped))
        listing.domains.append((name, files))
        listing.walk_skipped[name] = [os.path.relpath(s, root) for s in walk_skipped]
    assert classes is not None
    listing.classes = list(classes)
    return listing


def decode_files(files: Sequence[tuple[str, int]], input_size: int, root: str, pool,
                 ) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Decode ``(file, label)`` pairs: (HWC uint8 arrays, labels, skipped "file (why)")."""
    decoded = pool.map(_try_decode, [(f, input_size) for f, _ in files], chunksize=16)
    arrays, labels, skipped = [], [], []
    for (f, label), res in zip(files, decoded):
        if isinstance(res, str):
            rel = os.path.relpath(f, root)
            skipped.append(f"{rel} ({res.replace(f, rel)})")  # no local paths in the reasons
        else:
            arrays.append(res)
            labels.append(label)
    return arrays, labels, skipped


def make_domain(uri: str, name: str, index: int, images: torch.Tensor, labels: torch.Tensor,
                skipped: list[str], holdout_fraction: float, split_seed: int) -> Domain:
    """A domain from its decoded images (uint8 [N, 3, S, S]) with DomainBed's in/out split."""
    if len(labels) == 0:
        raise DataError(f"domain {name!r} of dataset {uri} has no readable images "
                        f"({len(skipped)} unreadable)")
    out_idx, in_idx = split_indices(len(labels), holdout_fraction, seed_hash(split_seed, index))
    return Domain(name=name, index=index, images=images, labels=labels,
                  out_idx=torch.tensor(out_idx, dtype=torch.int64),
                  in_idx=torch.tensor(in_idx, dtype=torch.int64), skipped=list(skipped))


def check_dataset(ds: DomainDataset, holdout_fraction: float) -> DomainDataset:
    for d in ds.train_domains:
        if len(d.in_idx) == 0:
            raise DataError(f"domain {d.name!r} of dataset {ds.uri} has no training images after the split")
    if not ds.validation_sets():
        raise DataError(f"dataset {ds.uri}: the training domains have no validation images "
                        f"(holdoutFraction {holdout_fraction} of too few images)")
    return ds


def decode_workers(workers: int | None = None) -> int:
    return workers or min(8, (os.cpu_count() or 2))


def load_dataset(uri: str, input_size: int, *, test_domains: Sequence[str] = (),
                 holdout_fraction: float = 0.2, split_seed: int = 0,
                 endpoint: str | None = None, workers: int | None = None) -> DomainDataset:
    """List, decode and split a dataset in memory (see :mod:`.prepared` for the cached form)."""
    _check_args(input_size, holdout_fraction)
    root = resolve_dataset(uri, endpoint)
    listing = list_dataset(uri, root, test_domains)
    domains: list[Domain] = []
    with ThreadPoolExecutor(max_workers=decode_workers(workers)) as pool:
        for di, (name, files) in enumerate(listing.domains):
            if not files:
                raise DataError(f"domain {name!r} of dataset {uri} has no images")
            arrays, labels, skipped = decode_files(files, input_size, root, pool)
            skipped = listing.walk_skipped.get(name, []) + skipped
            for s in skipped:
                _warn(f"skipping image {s}")
            images = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
                      if arrays else torch.empty((0, 3, input_size, input_size), dtype=torch.uint8))
            domains.append(make_domain(uri, name, di, images, torch.tensor(labels, dtype=torch.int64),
                                       skipped, holdout_fraction, split_seed))
    ds = DomainDataset(uri=uri, root=root, classes=listing.classes, domains=domains,
                       input_size=input_size, test_domains=tuple(test_domains))
    return check_dataset(ds, holdout_fraction)


# ------------------------------------------------------------------------------ batches


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def state_to_list(state: torch.Tensor) -> list[int]:
    return state.tolist()


def list_to_state(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.uint8)


class TrainStream:
    """Per-domain infinite samplers (with replacement, seeded), one batch of ``batch_size``
    per training domain per step, concatenated; then batched augmentation."""

    def __init__(self, dataset: DomainDataset, batch_size: int, seed: int, *, augment: bool = True):
        self.domains = dataset.train_domains
        self.batch_size = int(batch_size)
        self.augment = augment
        self.samplers = [_gen(seed_hash(seed, "sampler", d.index)) for d in self.domains]
        self.aug_gen = _gen(seed_hash(seed, "augment"))
        self._pools = [(d.images[d.in_idx], d.labels[d.in_idx]) for d in self.domains]

    def to(self, device: torch.device, pin: bool = False, max_device_bytes: int = 4 << 30) -> "TrainStream":
        pools = []
        on_device = sum(x.numel() for x, _ in self._pools) <= max_device_bytes
        for x, y in self._pools:
            if device.type != "cpu" and on_device:
                x, y = x.to(device), y.to(device)
            elif pin and torch.cuda.is_available():
                x, y = x.pin_memory(), y.pin_memory()
            pools.append((x, y))
        self._pools = pools
        return self

    def next_raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for g, (x, y) in zip(self.samplers, self._pools):
            idx = torch.randint(len(y), (self.batch_size,), generator=g)
            idx = idx.to(x.device)
            xs.append(x[idx])
            ys.append(y[idx])
        return torch.cat(xs), torch.cat(ys)

    def get_state(self) -> dict:
        return {"samplers": [state_to_list(g.get_state()) for g in self.samplers],
                "augment": state_to_list(self.aug_gen.get_state())}

    def set_state(self, state: dict) -> None:
        if len(state["samplers"]) != len(self.samplers):
            raise ValueError("checkpoint sampler count does not match the training domains")
        for g, s in zip(self.samplers, state["samplers"]):
            g.set_state(list_to_state(s))
        self.aug_gen.set_state(list_to_state(state["augment"]))


# ------------------------------------------------------------------------- augmentation

_GRAY = (0.2989, 0.587, 0.114)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return _GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc = x.amax(1)  # values only: the same numbers as max(1), without the indices
    minc = x.amin(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_div
    gc = (maxc - g) / cr_div
    bc = (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.tensor((5.0, 3.0, 1.0), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h * 6.0, 6.0)
    return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def _rrc_boxes(n: int, size: int, g: torch.Generator, scale=(0.7, 1.0),
               ratio=(3.0 / 4.0, 4.0 / 3.0)) -> torch.Tensor:
    """RandomResizedCrop.get_params for n images of size x size: boxes [n, 4] (x0, y0, x1, y1)
    in pixels, torchvision's 10-attempt rejection sampling with a center-crop fallback."""
    area = float(size * size)
    tries = 10
    u = torch.rand(n, tries, 4, generator=g, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    ar = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * ar))
    h = torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    found = ok.any(1)
    j = ok.float().argmax(1).unsqueeze(1)  # first accepted try (0 where none: masked below)
    wk = w.gather(1, j).squeeze(1)
    hk = h.gather(1, j).squeeze(1)
    uj = u.gather(1, j.unsqueeze(2).expand(n, 1, 4)).squeeze(1)
    # the same float64 arithmetic as math.floor(u * (size - h + 1)) on Python floats
    top = torch.floor(uj[:, 2] * (size - hk + 1))
    left = torch.floor(uj[:, 3] * (size - wk + 1))
    boxes = torch.stack((left, top, left + wk, top + hk), 1)
    # fallback: whole image (ratio always fits for square inputs)
    whole = torch.tensor([0.0, 0.0, float(size), float(size)], dtype=torch.float64)
    return torch.where(found.unsqueeze(1), boxes, whole)


# Smallest positive float32 (subnormal): ``x.clamp_min(_TINY)`` is ``x`` for every x > 0 and
# _TINY for x == 0, so ``0 / x.clamp_min(_TINY)`` is 0 like ``0 / where(x == 0, 1, x)``.
_TINY = 2.0 ** -149
_HSV_N = torch.tensor((5.0, 3.0, 1.0)).view(1, 3, 1, 1)


def _hue_shift(xs: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """``_hsv_to_rgb`` of ``_rgb_to_hsv(xs)`` with the hue shifted by ``hue`` [k, 1, 1] modulo 1:
    bit-identical to that composition (as in :func:`augment_batch_reference`) for inputs in
    [0, 1], in arithmetic without boolean tensors, ``where``, ``fmod`` or ``remainder`` (on the
    CPU those are several times slower than float arithmetic):

    - ``where(max == min, 1, d)`` as a divisor of ``max - min`` (0 exactly there):
      ``d.clamp_min(_TINY)`` (d >= 0; 0 / positive is 0 like 0 / 1, positives unchanged);
    - the masks ``max == r`` etc. as ``1 - sign(max - r)`` (max - r >= 0 is zero exactly when
      they are equal), the same 0/1 factors as the boolean masks, multiplied and summed as before;
    - ``fmod(t, 1)`` and ``remainder(t, 1)`` on t in [-0.3, 2) as ``t - floor(t)``, and
      ``remainder(k, 6)`` on k in [1, 11] as ``k - 6 * floor(k / 6)``: exact (Sterbenz), the
      same numbers (a zero may change sign where the next op adds n >= 1 to it); checked
      exhaustively over those float32 ranges in the tests.
    """
    r, g, b = xs.unbind(1)
    maxc = xs.amax(1)
    minc = xs.amin(1)
    cr = maxc - minc
    s = cr / maxc.clamp_min(_TINY)
    cr_div = cr.clamp_min(_TINY)
    rc = (maxc - r).div_(cr_div)
    gc = (maxc - g).div_(cr_div)
    bc = (maxc - b).div_(cr_div)
    not_r = torch.sign(maxc - r)                  # 0 where max == r, else 1
    not_g = torch.sign(maxc - g)
    hr = (1.0 - not_r).mul_(bc - gc)
    hg = ((1.0 - not_g).mul_(not_r)).mul_((2.0 + rc).sub_(bc))
    hb = (not_g * not_r).mul_((4.0 + gc).sub_(rc))
    h = hr.add_(hg).add_(hb).div_(6.0).add_(1.0)
    h = h.sub_(torch.floor(h))                    # fmod(h, 1) on [5/6, 2)
    h = h.add_(hue)
    h = h.sub_(torch.floor(h))                    # remainder(h, 1) on [-0.3, 1.3]
    # _hsv_to_rgb(h, s, v = max)
    h, s, v = h.unsqueeze(1), s.unsqueeze(1), maxc.unsqueeze(1)
    k = _HSV_N.to(xs.device) + h * 6.0
    k = k.sub_(torch.floor(k / 6.0).mul_(6.0))    # remainder(k, 6) on [1, 11]
    c = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).mul_(v * s)
    return c.neg_().add_(v)                       # v - v * s * c


def _blend_ops_(xs: torch.Tensor, op: torch.Tensor, factors: torch.Tensor) -> None:
    """Brightness (op 0), contrast (1) or saturation (2) per image of ``xs`` [k, 3, S, S], in
    place, with that op's factor from ``factors`` [k, 3]: each is ``clamp(f * x + (1 - f) *
    base)`` with base 0, the grey mean or the grey image (``_blend`` and ``(x * f).clamp``):
    the unused bases are multiplied by an exact 0, and adding a zero leaves the sum as it was."""
    k = xs.shape[0]
    dev = xs.device
    op = op.to(dev)
    f = factors.gather(1, op.unsqueeze(1)).view(k, 1, 1, 1)
    is_con = (op == 1).to(xs.dtype).view(k, 1, 1, 1)
    is_sat = (op == 2).to(xs.dtype).view(k, 1, 1, 1)
    gray = _grayscale(xs)
    base = (gray * is_sat).add_(gray.mean(dim=(1, 2, 3), keepdim=True) * is_con)
    xs.mul_(f).add_((1.0 - f) * base).clamp_(0.0, 1.0)


def augment_batch(x: torch.Tensor, g: torch.Generator, *, horizontal_flip: bool = True) -> torch.Tensor:
    """DomainBed's training augmentation on a uint8 batch [B, 3, S, S] -> float [0, 1].

    Per image: RandomResizedCrop(S, scale=(0.7, 1)), RandomHorizontalFlip(0.5),
    ColorJitter(0.3, 0.3, 0.3, 0.3) (brightness, contrast, saturation, hue in a random order per
    image), RandomGrayscale(0.1). Random parameters come from ``g`` (a CPU generator), drawn in
    the order crop boxes, flips, jitter factors, jitter orders, grayscale.

    ``horizontal_flip=False`` flips no image but still draws the flips (:func:`_flips`), so the
    crops and jitter of every batch are those of the same seed with flips on.

    Bit-identical to :func:`augment_batch_reference` (the straightforward form; the tests
    compare them), with fewer and cheaper ops: the images are cropped in the order of the
    position their hue op has in their jitter order (the crop's ROI order), so at every
    position the images getting the hue are one contiguous block and the others (brightness,
    contrast or saturation: one pass for the three, :func:`_blend_ops_`) the slices around it,
    all worked on in place; one gather at the end restores the batch order. Flip and grayscale
    touch only the chosen images; the hue is :func:`_hue_shift`.

    On other devices (CUDA) it is :func:`augment_batch_reference` itself: the exhaustive checks
    of the arithmetic replacements hold for the CPU's kernels (CUDA divides by a scalar through
    its reciprocal), and there the augmentation is not what limits a step."""
    if x.device.type != "cpu":
        return augment_batch_reference(x, g, horizontal_flip=horizontal_flip)
    from torchvision.ops import roi_align

    b, _, s, _ = x.shape
    dev = x.device
    boxes = _rrc_boxes(b, s, g)
    flip = _flips(b, g, horizontal_flip)
    u = torch.rand(b, 4, generator=g)
    order = torch.argsort(torch.rand(b, 4, generator=g), dim=1)  # order[i, pos] = op
    gray = torch.rand(b, generator=g) < 0.1
    factors = 0.7 + 0.6 * u[:, :3]                                # brightness, contrast, saturation
    hue = -0.3 + 0.6 * u[:, 3]
    # images grouped by the position of their hue op
    hue_pos = torch.argsort(order, dim=1)[:, 3]
    perm = torch.argsort(hue_pos, stable=True)
    ends = torch.cumsum(torch.bincount(hue_pos, minlength=4), 0).tolist()
    starts = [0] + ends[:3]
    # RandomResizedCrop (bilinear crop + resize of every image to S x S in one call), in perm order
    rois = torch.cat([perm.to(torch.float64).unsqueeze(1), boxes[perm]], 1).to(dev, torch.float32)
    xf = roi_align(x.float().div_(255.0), rois, output_size=(s, s), spatial_scale=1.0,
                   sampling_ratio=2, aligned=True)
    order, factors, flip, gray = order[perm], factors[perm].to(dev), flip[perm], gray[perm]
    hue = hue[perm].to(dev).view(b, 1, 1)
    # Horizontal flip of the chosen images
    idx = flip.nonzero().squeeze(1).to(dev)
    if idx.numel():
        xf.index_copy_(0, idx, xf.index_select(0, idx).flip(3))
    # ColorJitter, one position after the other
    for pos in range(4):
        lo, hi = starts[pos], ends[pos]
        for a, z in ((0, lo), (hi, b)):
            if z > a:
                _blend_ops_(xf[a:z], order[a:z, pos], factors[a:z])
        if hi > lo:
            xf[lo:hi] = _hue_shift(xf[lo:hi], hue[lo:hi])
    # RandomGrayscale(p=0.1), 3 output channels
    idx = gray.nonzero().squeeze(1).to(dev)
    if idx.numel():
        xf.index_copy_(0, idx, _grayscale(xf.index_select(0, idx)).expand(-1, 3, -1, -1))
    return xf.index_select(0, torch.argsort(perm).to(dev))


def _flips(b: int, g: torch.Generator, enabled: bool) -> torch.Tensor:
    """Which images RandomHorizontalFlip(0.5) flips; drawn even when disabled (then none), so
    that the switch never shifts the random parameters drawn after it."""
    flip = torch.rand(b, generator=g) < 0.5
    return flip if enabled else torch.zeros_like(flip)


def augment_batch_reference(x: torch.Tensor, g: torch.Generator, *,
                            horizontal_flip: bool = True) -> torch.Tensor:
    """The straightforward form of :func:`augment_batch` (the same numbers, more ops): kept as
    its specification and for the tests."""
    from torchvision.ops import roi_align

    b, _, s, _ = x.shape
    dev = x.device
    xf = x.float().div_(255.0)
    boxes = _rrc_boxes(b, s, g)
    rois = torch.cat([torch.arange(b, dtype=torch.float64).unsqueeze(1), boxes], 1).to(dev, torch.float32)
    xf = roi_align(xf, rois, output_size=(s, s), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flip = _flips(b, g, horizontal_flip).to(dev)
    xf = torch.where(flip.view(b, 1, 1, 1), xf.flip(3), xf)
    u = torch.rand(b, 4, generator=g)
    bright = (0.7 + 0.6 * u[:, 0]).to(dev).view(b, 1, 1, 1)
    contrast = (0.7 + 0.6 * u[:, 1]).to(dev).view(b, 1, 1, 1)
    sat = (0.7 + 0.6 * u[:, 2]).to(dev).view(b, 1, 1, 1)
    hue = (-0.3 + 0.6 * u[:, 3]).to(dev).view(b, 1, 1)
    order = torch.argsort(torch.rand(b, 4, generator=g), dim=1).to(dev)
    for pos in range(4):
        op_at = order[:, pos]
        for op in range(4):
            idx = (op_at == op).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            xs = xf.index_select(0, idx)
            if op == 0:
                y = (xs * bright[idx]).clamp(0.0, 1.0)
            elif op == 1:
                mean = _grayscale(xs).mean(dim=(1, 2, 3), keepdim=True)
                y = _blend(xs, mean, contrast[idx])
            elif op == 2:
                y = _blend(xs, _grayscale(xs), sat[idx])
            else:
                hsv = _rgb_to_hsv(xs)
                h = torch.remainder(hsv[:, 0] + hue[idx], 1.0)
                y = _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))
            xf.index_copy_(0, idx, y)
    gray = (torch.rand(b, generator=g) < 0.1).to(dev)
    xf = torch.where(gray.view(b, 1, 1, 1), _grayscale(xf).expand(-1, 3, -1, -1), xf)
    return xf


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def normalize(xf: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=xf.device, dtype=xf.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=xf.device, dtype=xf.dtype).view(1, 3, 1, 1)
    return (xf - mean) / std


def _normalize_(xf: torch.Tensor) -> torch.Tensor:
    """:func:`normalize` in place (the same numbers) on a float32 batch of our own."""
    if xf.device.type == "cpu" and xf.dtype == torch.float32:
        return xf.sub_(_MEAN).div_(_STD)
    return normalize(xf)


def eval_transform(x: torch.Tensor) -> torch.Tensor:
    """Evaluation: images are already resized at decode time; scale and normalize."""
    return _normalize_(x.float().div_(255.0))


def train_transform(x: torch.Tensor, g: torch.Generator, *, horizontal_flip: bool = True) -> torch.Tensor:
    return _normalize_(augment_batch(x, g, horizontal_flip=horizontal_flip))
