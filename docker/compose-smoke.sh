#!/usr/bin/env bash
# Bring the compose stack up for real where Docker Hub and GPUs are not (a manual check; CI does not run
# it): docker/compose-smoke/derive.py makes a copy of docker-compose.yml with local stand-ins for the two
# Hub images (Postgres 15 from Debian packages, docker/compose-smoke/Dockerfile.postgres; the satdet CPU
# image as the Prefect server, same pinned Prefect) and no GPU reservation; all else is the real file.
# Checks: all three services healthy, the port on 127.0.0.1 only, the trainer's deployment registered,
# named volumes writable for a uid that is not 1000; then PREFECT_SERVER_BIND=0.0.0.0 alone stops the
# server (exit 78), and with PREFECT_SERVER_API_AUTH_STRING the API answers 401 without and 200 with it.
# Needs a running engine, `docker compose` (v2) or Debian's docker-compose (v1), and the CPU image
# (IMAGE, default satdet:container-test-cpu, which docker/container-test.sh leaves). Ends with
# "compose-smoke: N passed, N failed"; tears the stack and its volumes down.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
IMAGE=${IMAGE:-satdet:container-test-cpu}
BASE=${BASE_IMAGE:-satdet-base:bookworm}
PG=satdet-local/postgres:15
UIDGID=${CONTAINER_TEST_UID:-4321}
PY=${PY:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
passed=0 failed=0
say() { printf 'compose-smoke: %s\n' "$*"; }
check() { local what=$1; shift; if "$@"; then passed=$((passed + 1)); say "ok   $what"; else failed=$((failed + 1)); say "FAIL $what"; fi; }

DOCKER=$(docker/buildkit-docker.sh) || exit 1
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
$DOCKER info >/dev/null 2>&1 || { say "no engine (docker/container-test.sh with KEEP=1 leaves one)"; exit 1; }
$DOCKER image inspect "$IMAGE" >/dev/null 2>&1 || { say "no $IMAGE: run docker/container-test.sh first"; exit 1; }
$DOCKER image inspect "$BASE" >/dev/null 2>&1 || BASE_IMAGE=$BASE docker/debian-base.sh || exit 1
DOCKER_BUILDKIT=1 $DOCKER build -q --build-arg BASE="$BASE" -f docker/compose-smoke/Dockerfile.postgres \
    -t "$PG" docker/compose-smoke >/dev/null || { say "stand-in Postgres image failed"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/satdet-compose-smoke.XXXXXX")
mkdir -p "$work/runs" "$work/data" && cp -r configs "$work/configs"
[[ $(id -u) -ne 0 ]] || chown -R "$UIDGID:$UIDGID" "$work"
"$PY" docker/compose-smoke/derive.py docker-compose.yml "$work/docker-compose.yml" "$IMAGE" "$PG"
compose() { (cd "$work" && SATDET_UID=$UIDGID SATDET_GID=$UIDGID "${COMPOSE[@]}" -p satdet-smoke "$@"); }
cleanup() { compose down -v >/dev/null 2>&1; rm -rf "$work"; }
trap cleanup EXIT
healthy() {  # wait until every service is healthy (or $1 seconds pass)
    local end=$((SECONDS + $1))
    while ((SECONDS < end)); do
        local states
        states=$(compose ps -q | xargs -r $DOCKER inspect -f '{{.State.Health.Status}}' 2>/dev/null | sort -u)
        [[ "$states" == healthy ]] && return 0
        sleep 5
    done
    compose ps; return 1
}
api() { curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' -d '{}' "$@" \
        http://127.0.0.1:4200/api/deployments/filter; }
cid() { compose ps -q "$1"; }

start=$SECONDS
compose up -d >/dev/null 2>&1
check "postgres, prefect-server and trainer healthy" healthy 300
say "     up and healthy in $((SECONDS - start)) s"
check "port published on 127.0.0.1 only" test "$($DOCKER port "$(cid prefect-server)" 4200/tcp)" = "127.0.0.1:4200"
check "/api/health answers" test "$(curl -s http://127.0.0.1:4200/api/health)" = true
deployments=$(curl -s -X POST -H 'Content-Type: application/json' -d '{}' http://127.0.0.1:4200/api/deployments/filter)
registered() { grep -q '"name":"retrain-gpu-r50"' <<<"$deployments" && grep -q -F '"cron":"0 3 * * 0"' <<<"$deployments"; }
check "the trainer registered retrain-gpu-r50 with its cron" registered
check "trainer runs as $UIDGID and can write /work/.prefect, /work/.keras and /work/runs" \
    compose exec -T trainer sh -c "test \$(id -u) = $UIDGID && touch /work/.prefect/p /work/.keras/p /work/runs/p"

(export PREFECT_SERVER_BIND=0.0.0.0; compose up -d --no-deps prefect-server >/dev/null 2>&1)
refused() {  # the server container exits 78 (and restarts, then exits again) with its message
    local id end=$((SECONDS + 60))
    id=$(cid prefect-server)
    while ((SECONDS < end)); do
        [[ $($DOCKER inspect -f '{{.State.ExitCode}}' "$id") == 78 ]] \
            && $DOCKER logs "$id" 2>&1 | grep -q PREFECT_SERVER_API_AUTH_STRING && return 0
        sleep 3
    done
    $DOCKER inspect -f '{{.State.Status}} exit={{.State.ExitCode}}' "$id"; $DOCKER logs --tail 5 "$id"; return 1
}
check "PREFECT_SERVER_BIND=0.0.0.0 without an auth string: the server exits 78 and says why" refused

export PREFECT_SERVER_BIND=0.0.0.0 PREFECT_SERVER_API_AUTH_STRING=admin:smoke-test
start=$SECONDS
compose up -d >/dev/null 2>&1
check "with an auth string: all healthy again" healthy 300
say "     in $((SECONDS - start)) s"
check "published on 0.0.0.0" bash -c "$DOCKER port $(cid prefect-server) 4200/tcp | grep -q '^0.0.0.0:4200'"
check "API: 401 without credentials" test "$(api)" = 401
check "API: 200 with them" test "$(api -u admin:smoke-test)" = 200
say "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
