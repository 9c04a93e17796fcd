#!/usr/bin/env bash
# Print a docker client that builds with BuildKit (the Dockerfile's RUN --mount needs it):
#   - `docker` when it has the buildx plugin (Docker >= 23 as packaged by Docker) or is itself older than 23
#     (20.10's client has BuildKit built in: DOCKER_BUILDKIT=1);
#   - else Debian's docker.io client (/usr/bin/docker, 20.10 on bookworm), as when a newer client without
#     buildx sits earlier on PATH.
# Exits 1 with a hint when there is none. Used by the Makefile (DOCKER ?= ...) and docker/container-test.sh.
set -uo pipefail
major() { "$1" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 | tr -dc 0-9; }
for c in "${DOCKER:-docker}" /usr/bin/docker; do
    path=$(command -v "$c" 2>/dev/null) || continue
    if "$path" buildx version >/dev/null 2>&1; then echo "$path"; exit 0; fi
    m=$(major "$path")
    if [[ -n "$m" && "$m" -lt 23 ]]; then echo "$path"; exit 0; fi
done
echo "no docker client that can build with BuildKit: install the buildx plugin (docker-buildx)" \
     "or use Debian's docker.io client" >&2
exit 1
