#!/usr/bin/env bash
# Make a Python base image from Debian packages alone, for building satdet where no container registry
# (Docker Hub) is reachable: debootstrap a Debian rootfs with python3, python3-venv and ca-certificates,
# then `docker import` it. Only a Debian mirror is needed. The result works as the Dockerfile's base:
#
#   docker/debian-base.sh                      # -> satdet-base:bookworm (Python 3.11 from Debian)
#   make image-cpu PYTHON_IMAGE=satdet-base:bookworm PIP_CA=/path/to/ca-bundle.crt
#
# Needs root (debootstrap) and a running Docker engine. Skips the work if the tag already exists
# (REBUILD=1 forces it). Settings, all optional:
#   BASE_IMAGE      tag to create                  (default satdet-base:$DEBIAN_SUITE)
#   DEBIAN_SUITE    Debian release                 (default bookworm: Python 3.11, like the default base)
#   DEBIAN_MIRROR   mirror URL                     (default: the first deb.debian.org-style URI apt uses
#                                                   here, else http://deb.debian.org/debian)
#   DOCKER          docker client                  (default docker)
set -euo pipefail

SUITE=${DEBIAN_SUITE:-bookworm}
TAG=${BASE_IMAGE:-satdet-base:$SUITE}
DOCKER=${DOCKER:-docker}

if [[ -z "${REBUILD:-}" ]] && $DOCKER image inspect "$TAG" >/dev/null 2>&1; then
    echo "debian-base: $TAG exists (REBUILD=1 to remake it)"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "debian-base: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debian-base: install debootstrap (apt-get install debootstrap)" >&2; exit 1; }

mirror=${DEBIAN_MIRROR:-}
if [[ -z "$mirror" ]]; then
    # The mirror this machine's apt already reaches (a proxy or an internal mirror works the same way).
    mirror=$(grep -h -o -E '^(URIs:|deb) +[^ ]*http[^ ]*/debian/?( |$)' /etc/apt/sources.list.d/*.sources \
             /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}' | head -n1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
fi

rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/satdet-rootfs.XXXXXX")
trap 'rm -rf --one-file-system "$rootfs"' EXIT

echo "debian-base: debootstrap $SUITE from $mirror"
start=$SECONDS
# minbase: essential + apt; python3-venv brings ensurepip's wheels (the Dockerfile's `python3 -m venv`).
for attempt in 1 2 3; do
    if debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$mirror" > "$rootfs.log" 2>&1; then
        break
    fi
    tail -n 20 "$rootfs.log" >&2
    [[ $attempt -lt 3 ]] || { echo "debian-base: debootstrap failed 3 times" >&2; exit 1; }
    echo "debian-base: debootstrap failed, retrying ($attempt/3)" >&2
    rm -rf --one-file-system "$rootfs"; mkdir -p "$rootfs"
done
rm -f "$rootfs.log"

# Trim what an image does not need: package caches and lists, docs and man pages.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.cache
py=$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')

tar --numeric-owner --xattrs -C "$rootfs" -c . | $DOCKER import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase, python3 $py, python3-venv, ca-certificates (debootstrap, satdet docker/debian-base.sh)\"" \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
echo "debian-base: $TAG (python $py) in $((SECONDS - start)) s, $($DOCKER image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
