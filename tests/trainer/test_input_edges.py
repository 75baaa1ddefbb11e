"""Dataset input edges (issue 12): what walking a dataset may open, huge images, S3 sync."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest

from ratatouille_trainer.data import decode_image, load_dataset, max_image_pixels
from ratatouille_contract.layout import join
from ratatouille_trainer.storage import open_storage

from .util import INPUT, write_dataset


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (opening a FIFO blocks until a writer comes)."""
    def boom(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _count(ds, domain, cls_index=None):
    d = ds.domain(domain)
    if cls_index is None:
        return len(d)
    return int((d.labels == cls_index).sum())


def test_named_pipe_is_skipped_not_opened(tmp_path):
    root = write_dataset(tmp_path / "ds", per_class=4)
    os.mkfifo(root / "d0" / "circle" / "pipe.png")
    # In a child process: a decoder thread blocked in open() on the FIFO cannot be interrupted.
    code = ("import sys; from ratatouille_trainer.data import load_dataset; "
            f"ds = load_dataset({str(root)!r}, {INPUT}, test_domains=('d2',)); d = ds.domain('d0'); "
            "print(len(d)); print('|'.join(d.skipped))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("loading a dataset with a named pipe in it hangs")
    assert out.returncode == 0, out.stderr
    count, skipped = out.stdout.splitlines()
    assert int(count) == 12
    assert "pipe.png (not a regular file)" in skipped


def test_symlink_loop_does_not_multiply_a_class(tmp_path):
    root = write_dataset(tmp_path / "ds", per_class=4)
    os.symlink("..", root / "d0" / "circle" / "loop")          # circle/loop -> d0
    os.symlink(".", root / "d0" / "square" / "self")           # square/self -> square
    with deadline(60):
        ds = load_dataset(str(root), INPUT, test_domains=("d2",))
    assert [_count(ds, "d0", c) for c in range(3)] == [4, 4, 4]
    assert _count(ds, "d1") == 12


def test_links_outside_the_root_are_not_followed(tmp_path):
    root = write_dataset(tmp_path / "ds", per_class=4)
    outside = write_dataset(tmp_path / "elsewhere", per_class=5, seed=9)
    os.symlink(outside / "d0" / "circle" / "0.png", root / "d0" / "circle" / "stolen.png")
    os.symlink(outside / "d0" / "square", root / "d0" / "square" / "more")
    os.symlink(outside / "d1", root / "d9")                      # a whole domain from elsewhere
    inside = root / "d0" / "triangle" / "alias.png"               # a link inside the root is fine
    os.symlink(root / "d1" / "triangle" / "0.png", inside)
    ds = load_dataset(str(root), INPUT, test_domains=("d2",))
    assert ds.domain_names == ["d0", "d1", "d2"]
    assert [_count(ds, "d0", c) for c in range(3)] == [4, 4, 5]
    reasons = " ".join(ds.domain("d0").skipped)
    assert "stolen.png (leads outside the dataset root)" in reasons
    assert "more (leads outside the dataset root)" in reasons


def _png_1bit(path, width: int, height: int) -> None:
    """A valid 1-bit greyscale PNG of width x height, all black, written without PIL (a few
    hundred kB on disk for tens of megapixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_huge_image_is_skipped_from_its_header(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "ds", per_class=4)
    big = root / "d0" / "circle" / "huge.png"
    _png_1bit(big, 9000, 5000)                                   # 45 Mpx, below PIL's own limits
    assert big.stat().st_size < 200_000
    assert max_image_pixels(INPUT) == 40_000_000
    from PIL import Image

    loads = []
    real_load = Image.Image.load

    def counting_load(self):
        if self.size == (9000, 5000):
            loads.append(self.size)
        return real_load(self)
    monkeypatch.setattr(Image.Image, "load", counting_load)
    ds = load_dataset(str(root), INPUT, test_domains=("d2",))
    assert _count(ds, "d0", 0) == 4
    assert loads == [], "the huge image was decoded"
    reason = [s for s in ds.domain("d0").skipped if "huge.png" in s]
    assert reason and "45.0 Mpx, above the cap of 40.0 Mpx for inputSize 32" in reason[0]
    # the cap follows inputSize, and an explicit setting wins
    assert max_image_pixels(512) == min(89_478_485, 512 * 512 * 512)
    monkeypatch.setenv("RATATOUILLE_MAX_IMAGE_PIXELS", str(50_000_000))
    assert decode_image(str(big), 8).shape == (8, 8, 3)


def test_s3_sync_removes_files_deleted_upstream(s3_bucket, moto_server, tmp_path, monkeypatch):
    monkeypatch.setenv("RATATOUILLE_CACHE_DIR", str(tmp_path / "cache"))
    local = write_dataset(tmp_path / "ds", per_class=3)
    s = open_storage(s3_bucket, moto_server)
    prefix = join(s3_bucket, "sync-edges")
    rels = sorted(str(p.relative_to(local)) for p in local.rglob("*.png"))
    for rel in rels:
        s.upload(str(local / rel), join(prefix, rel))
    first = load_dataset(prefix, INPUT, test_domains=("d2",), endpoint=moto_server)
    assert sum(len(d) for d in first.domains) == 27
    gone = [rels[i] for i in (0, 1, 3, 4)]                      # d0/circle/0,1 and d0/square/0,1
    for rel in gone:
        s.delete(join(prefix, rel))
    again = load_dataset(prefix, INPUT, test_domains=("d2",), endpoint=moto_server)
    assert sum(len(d) for d in again.domains) == 23
    assert [_count(again, "d0", c) for c in range(3)] == [1, 1, 3]
    left = sorted(str(p.relative_to(again.root)) for p in Path(again.root).rglob("*.png"))
    assert left == [r for r in rels if r not in gone]
