"""The Dockerfile's images built with podman by scripts/images/build.sh (a Debian base made with
debootstrap, no registry): what the image tests and the node agent's containers use."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TAG = "test"
OPERATOR, TRAINER = f"localhost/ratatouille-operator:{TAG}", f"localhost/ratatouille:{TAG}"
CONTAINERS_CONF = ROOT / "scripts" / "images" / "containers.conf"


class ImagesUnavailable(RuntimeError):
    """podman or debootstrap is missing here (make system-deps installs them)."""


def podman_env() -> dict[str, str]:
    return dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))


def build() -> dict[str, str]:
    """Build (or find cached) both images; image -> size as build.sh reports it."""
    if shutil.which("podman") is None or shutil.which("debootstrap") is None:
        raise ImagesUnavailable("podman and debootstrap are not installed (make system-deps installs them)")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "images" / "build.sh"), TAG], env=podman_env(),
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/images/build.sh failed:\n{proc.stderr[-4000:]}")
    return dict(line.split(" ", 1) for line in proc.stderr.splitlines() if line.startswith("localhost/ratatouille"))
