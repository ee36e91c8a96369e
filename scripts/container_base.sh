#!/usr/bin/env bash
# A stand-in for the Dockerfile's official base images, for machines that cannot pull them (our CI: no Docker Hub).
#
#   scripts/container_base.sh            build it once into podman's image store, print its tag (cached after that)
#   scripts/container_base.sh --force    rebuild it
#   scripts/container_base.sh --remove   remove it from podman's store
#
# What it is: Debian 12 minbase with Python 3.11 (what python:3.11-slim-bookworm is), plus the CPU build of torch
# (what the CPU variant's runtime stage would install from the PyTorch CPU index, which is unreachable here), so the
# Dockerfile builds unchanged with `--build-arg BASE=<this tag>`. Everything else (the project's wheel, its
# dependencies) the Dockerfile itself installs from PyPI during the build.
#
# This machine reaches PyPI only through its own pip configuration and CA bundle, so the stand-in carries that CA
# bundle and a pip.conf pointing at it: the Dockerfile's builder stage fetches its build backend (setuptools) from
# PyPI. The real bases need neither.
#
# Needs root, debootstrap and podman (Debian: apt-get install debootstrap podman), and the CPU torch wheel where
# this machine's pip finds it (`pip download torch==2.13.0` must give a +cpu wheel: a CUDA one is refused, it is
# several GB). Cached: the image is labelled with a hash of this script and the torch version; a run that finds a
# matching image does nothing. Output: progress on stderr, the tag alone on stdout.
set -euo pipefail

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SUITE=bookworm
TAG=${MAE_BASE_IMAGE:-localhost/mae-serve-base:${SUITE}-torch${TORCH_VERSION}-cpu}
HOST_PYTHON=${HOST_PYTHON:-python3}
recipe=$( (cat "$0"; echo "$TORCH_VERSION") | sha256sum | cut -c1-16)
say() { echo "container_base: $*" >&2; }

case "${1:-}" in
  --remove) podman image rm -f "$TAG" >/dev/null 2>&1 || true; say "removed $TAG"; exit 0 ;;
  --force | "") ;;
  *) echo "usage: $0 [--force|--remove]" >&2; exit 2 ;;
esac

for tool in debootstrap podman chroot "$HOST_PYTHON"; do
  command -v "$tool" >/dev/null || { say "$tool is not installed (apt-get install debootstrap podman)"; exit 3; }
done
if [ "${1:-}" != --force ] && podman image exists "$TAG" \
  && [ "$(podman image inspect --format '{{ index .Labels "mae-serve.base-recipe" }}' "$TAG")" = "$recipe" ]; then
  say "cached: $TAG"
  echo "$TAG"
  exit 0
fi

work=$(mktemp -d /var/tmp/mae-serve-base.XXXXXX)
root="$work/root"
cleanup() {
  mountpoint -q "$root/proc" && umount "$root/proc"
  rm -rf "$work"
}
trap cleanup EXIT

# A command in the stand-in, with a clean environment: only its own pip.conf counts (this shell's PIP_* variables
# name paths of the host), and PATH as in a container.
inside() {
  chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"
}

# 1. Debian minbase with Python (37-50 s).
t0=$SECONDS
say "debootstrap $SUITE into $root"
if ! debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
  "$SUITE" "$root" >"$work/debootstrap.log" 2>&1; then
  tail -20 "$work/debootstrap.log" >&2
  exit 1
fi
say "debootstrap took $((SECONDS - t0)) s"

# 2. This machine's way to PyPI: its CA bundle and index, as pip sees them here (env first, then pip's config).
pip_setting() {  # pip_setting KEY: the value pip would use for KEY (e.g. cert, index-url), or nothing
  local env_name="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  if [ -n "${!env_name:-}" ]; then echo "${!env_name}"; return; fi
  "$HOST_PYTHON" -m pip config list 2>/dev/null | sed -n "s/^global\.$1='\(.*\)'$/\1/p" | tail -1
}
ca=$(pip_setting cert)
ca=${ca:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
index=$(pip_setting index-url)
cp "$ca" "$root/etc/pip-ca-bundle.crt"
{
  echo "# The CI machine's way to PyPI (scripts/container_base.sh): its CA bundle, its index. Not in a real base."
  echo "[global]"
  echo "cert = /etc/pip-ca-bundle.crt"
  case "$index" in http*) echo "index-url = $index" ;; esac
  echo "timeout = 180"
} >"$root/etc/pip.conf"

# 3. The CPU build of torch, fetched by this machine's pip for the stand-in's Python, installed inside it (its
#    pure-Python dependencies come from PyPI through the pip.conf above).
pyver=$(inside python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
mkdir -p "$root/tmp/wheels"
t0=$SECONDS
"$HOST_PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
  --dest "$root/tmp/wheels" "torch==$TORCH_VERSION" >&2
wheel=$(cd "$root/tmp/wheels" && ls torch-*.whl)
case "$wheel" in
  *+cpu*) ;;
  *) say "pip found $wheel, not a CPU build of torch (a CUDA build is several GB); put the +cpu wheel where pip finds it"
     exit 1 ;;
esac
mount -t proc proc "$root/proc"
inside PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
  python3 -m pip install -q "/tmp/wheels/$wheel" >&2
inside python3 -c "import torch; print('container_base: torch', torch.__version__, 'in the stand-in')" >&2
umount "$root/proc"
rm -rf "$root/tmp/wheels" "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root/root/.cache"
say "torch took $((SECONDS - t0)) s"

# 4. Into podman's store as a one-layer image (replacing an older stand-in under the same tag).
t0=$SECONDS
old=$(podman image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
tar -C "$root" --numeric-owner -c . | podman import --quiet \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --change "LABEL mae-serve.base-recipe=$recipe" \
  --message "mae-serve stand-in base: Debian $SUITE minbase, Python $pyver, torch $TORCH_VERSION CPU" \
  - "$TAG" >/dev/null
new=$(podman image inspect --format '{{.Id}}' "$TAG")
if [ -n "$old" ] && [ "$old" != "$new" ]; then podman rmi "$old" >/dev/null 2>&1 || true; fi
say "podman import took $((SECONDS - t0)) s: $TAG ($(podman image inspect --format '{{.Size}}' "$TAG") bytes)"
echo "$TAG"
