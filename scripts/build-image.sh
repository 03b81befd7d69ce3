#!/usr/bin/env bash
# Build the guard image for real, without a Docker engine or a registry (not part of CI: slow).
#
# 1. installs buildah and debootstrap from Debian (needs root: apt-get, debootstrap and chroot do);
# 2. makes a local base image: `debootstrap --variant=minbase bookworm` plus python3-venv
#    (bookworm's python3 is 3.11), imported with `FROM scratch` + ADD of the rootfs tarball;
# 3. builds ./Dockerfile on it with `buildah bud --isolation chroot --storage-driver vfs`, passing the
#    base through the BASE_IMAGE build ARG. pip inside the build trusts the host's CA bundle, mounted
#    read-only at /run/host-ca/ca-certificates.crt with PIP_CERT pointing at it;
# 4. smoke-tests the image: the guard, as UID 10001 on a read-only root with only /tmp writable,
#    answers the HEALTHCHECK command; then prints the image size.
#
# Usage: sudo scripts/build-image.sh [IMAGE]   (default IMAGE: localhost/inference-guard:dev)
# Env: WORK (scratch dir, default /var/tmp/inference-guard-build), MIRROR (Debian mirror, default
#      deb.debian.org), REBUILD_BASE=1 to remake the base, CA_BUNDLE (default the Debian path),
#      CONTEXT (build context, default the repository root), SKIP_BUILD=1 to only smoke-test.
set -euo pipefail

image="${1:-localhost/inference-guard:dev}"
base_image="localhost/inference-guard-base:bookworm"
work="${WORK:-/var/tmp/inference-guard-build}"
mirror="${MIRROR:-http://deb.debian.org/debian}"
ca_bundle="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
storage=(--storage-driver vfs)
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
context="${CONTEXT:-$repo_root}"

if [[ "$(id -u)" != 0 ]]; then
  echo "run as root: apt-get, debootstrap and buildah's chroot isolation need it" >&2
  exit 1
fi

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing buildah and debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah debootstrap
fi

mkdir -p "$work"
if [[ "${REBUILD_BASE:-0}" == 1 ]] || ! buildah "${storage[@]}" inspect --type image "$base_image" >/dev/null 2>&1; then
  log "debootstrap bookworm (minbase + python3-venv) into $work/rootfs"
  rm -rf "$work/rootfs" "$work/base"
  debootstrap --variant=minbase --include=python3-venv,ca-certificates bookworm "$work/rootfs" "$mirror"
  # Drop what a runtime base does not need: apt lists, caches, docs.
  rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*.bin \
         "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/usr/share/doc/"* \
         "$work/rootfs/usr/share/man/"* "$work/rootfs/usr/share/info/"*
  mkdir -p "$work/base"
  tar -C "$work/rootfs" --numeric-owner -cf "$work/base/rootfs.tar" .
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' > "$work/base/Containerfile"
  log "importing the base as $base_image"
  buildah "${storage[@]}" bud --isolation chroot --layers=false -f "$work/base/Containerfile" \
    -t "$base_image" "$work/base"
  rm -rf "$work/rootfs" "$work/base"
fi

if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
  log "SKIP_BUILD=1: smoke-testing the existing $image"
else
log "building $image from $context"
buildah "${storage[@]}" bud --isolation chroot --format docker \
  --build-arg "BASE_IMAGE=$base_image" \
  --build-arg "PIP_CERT=/run/host-ca/ca-certificates.crt" \
  -v "$ca_bundle:/run/host-ca/ca-certificates.crt:ro" \
  -t "$image" -f "$repo_root/Dockerfile" "$context"
fi

log "smoke test: the image's user, and the guard serving from a read-only root"
ctr="$(buildah "${storage[@]}" from "$image")"
ro="$work/ro-root"
guard_pid=""
cleanup() {
  [[ -n "$guard_pid" ]] && kill "$guard_pid" 2>/dev/null && wait "$guard_pid" 2>/dev/null
  for m in "$ro/proc" "$ro/tmp" "$ro"; do mountpoint -q "$m" && umount "$m"; done
  buildah "${storage[@]}" umount "$ctr" >/dev/null 2>&1 || true
  buildah "${storage[@]}" rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT
buildah "${storage[@]}" run --isolation chroot "$ctr" -- id
# The container's root, bind-mounted read-only, with only /tmp writable (what the chart does),
# entered as UID/GID 10001 with the image's PATH. Loopback ports of the host: chroot shares them.
mnt="$(buildah "${storage[@]}" mount "$ctr")"
mkdir -p "$ro"
mount --bind "$mnt" "$ro"
mount -o remount,bind,ro "$ro"
mount -t tmpfs -o size=64m,mode=1777 tmpfs "$ro/tmp"
mount -t proc proc "$ro/proc"
in_image=(chroot --userspec=10001:10001 "$ro"
          /usr/bin/env -i PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin PYTHONDONTWRITEBYTECODE=1)
if touch "$ro/opt/probe" 2>/dev/null; then echo "root is not read-only" >&2; exit 1; fi
"${in_image[@]}" guard-agent run --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:19090 \
  --upstream http://127.0.0.1:18081 > "$work/guard-smoke.log" 2>&1 &
guard_pid=$!
healthy=0
for _ in $(seq 1 60); do
  # the image's HEALTHCHECK command, run inside the image
  if "${in_image[@]}" python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:19090/livez', timeout=2)" 2>/dev/null; then
    healthy=1; break
  fi
  sleep 0.5
done
if [[ "$healthy" != 1 ]]; then
  echo "the guard did not answer /livez from a read-only root; its log:" >&2
  cat "$work/guard-smoke.log" >&2
  exit 1
fi
log "read-only root, UID 10001: /livez answered (HEALTHCHECK command passes)"

log "result"
buildah "${storage[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E "inference-guard" || true
buildah "${storage[@]}" push "$image" "oci-archive:$work/inference-guard.oci.tar" >/dev/null
ls -l "$work/inference-guard.oci.tar" | awk '{printf "oci archive (compressed layers): %.1f MiB\n", $5/1048576}'
