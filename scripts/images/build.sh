#!/usr/bin/env bash
# Build the two images of the Dockerfile with podman, from Debian's packages only:
#   scripts/images/build.sh [TAG]     -> localhost/ratatouille-operator:TAG, localhost/ratatouille:TAG
# No registry can be reached here, so the base is made with debootstrap (Debian bookworm with
# python3 and its venv module) and `podman import`ed once per machine; the Dockerfile takes it as
# BASE (users keep the public python image). Dependencies install in the build with this
# machine's own pip configuration, CA bundle and pip cache mounted in, and its network.
# podman's layer cache makes a rebuild after a code change cost one small layer.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
tag="${1:-dev}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/scripts/images/containers.conf}"
base=localhost/ratatouille-base:bookworm
log() { echo "[build-images] $*" >&2; }

if ! podman image exists "$base"; then
  mirror="$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)"
  mirror="${mirror:-http://deb.debian.org/debian}"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  log "debootstrap bookworm from $mirror"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" "$mirror" >&2
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/* \
         "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/* "$work"/rootfs/usr/share/locale/*
  tar -C "$work/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$base" >&2
fi

mounts=()
[[ -d "$HOME/.cache/pip" ]] && mounts+=(-v "$HOME/.cache/pip:/root/.cache/pip")
[[ -f /etc/pip.conf ]] && mounts+=(-v /etc/pip.conf:/etc/pip.conf:ro)
[[ -f /etc/ssl/certs/ca-certificates.crt ]] && mounts+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
envs=()
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_CERT PIP_DEFAULT_TIMEOUT; do
  [[ -n "${!var:-}" ]] && envs+=(--build-arg "$var")
done
for target in operator trainer; do
  name=localhost/ratatouille-operator
  [[ $target == trainer ]] && name=localhost/ratatouille
  log "building $name:$tag (target $target)"
  podman build --network host "${mounts[@]}" "${envs[@]}" --build-arg "BASE=$base" \
    --target "$target" -t "$name:$tag" "$root" >&2
done
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "ratatouille(-operator)?:$tag " >&2 || true
