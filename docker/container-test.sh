#!/usr/bin/env bash
# The container, built and run for real (CI runs this from .ci/run; `make container-test` locally).
#
#  1. a Docker engine: the running one, else `dockerd` started here (as root; Debian's docker.io and
#     debootstrap are installed with apt-get when missing and we are root);
#  2. a base image: $PYTHON_IMAGE if given, else satdet-base:bookworm made from Debian packages by
#     docker/debian-base.sh (no registry needed; reused when it exists);
#  3. the CPU image (`make image-cpu`, layer cache reused between runs), with the machine's CA bundle as
#     the pip_ca build secret when there is one;
#  4. as a non-root uid (yours, or $CONTAINER_TEST_UID when run as root) with a project folder
#     bind-mounted at /work (a scratch copy of configs/ and data/neon-trees/): `satdet doctor`, a 4-step
#     `satdet run configs/demo.yaml`, `satdet predict` on data/neon-trees/OSBS_029.tif; then checks on the
#     host: the run folder (config.yaml, tiles, model/export, eval/metrics.json), the GeoJSON, and that
#     every file written belongs to that uid.
# Prints each phase's seconds and the image sizes, and ends with "container-test: N passed, N failed".
# Skips (exit 0, loudly) only when no engine can be reached or started (e.g. not root and no engine) or
# the engine's disk has under 10 GB free; CONTAINER_TEST_REQUIRED=1 makes that a failure.
#
# Settings: PYTHON_IMAGE, PIP_CA (default /etc/ssl/certs/ca-certificates.crt when present; PIP_CA= to pass
# none), PIP_CONF, CONTAINER_TEST_UID/GID (default 4321), KEEP=1 (keep the scratch folder and the engine
# this script started), CONTAINER_TEST_GPU=1 (also build the GPU image, for its size; not run).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

passed=0 failed=0
declare -A secs
t0=$SECONDS
say() { printf 'container-test: %s\n' "$*"; }
ok() { passed=$((passed + 1)); say "ok   $*"; }
bad() { failed=$((failed + 1)); say "FAIL $*"; }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
banner() { printf '\n%s\n%s\n%s\n\n' "################################################################" "$*" \
    "################################################################" >&2; }
skip() {
    banner "container-test SKIPPED: $*"
    if [[ -n "${CONTAINER_TEST_REQUIRED:-}" ]]; then say "0 passed, 1 failed"; exit 1; fi
    exit 0
}
timed() { local name=$1; shift; local s=$SECONDS; "$@"; local rc=$?; secs[$name]=$((SECONDS - s)); return $rc; }

# ------------------------------------------------------------------------------------------ 1. engine
is_root() { [[ $(id -u) -eq 0 ]]; }
if is_root && command -v apt-get >/dev/null && { ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; }; then
    say "installing docker.io and debootstrap (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    timed apt apt-get -o Acquire::Retries=3 update -qq \
        && apt-get -o Acquire::Retries=3 install -y -qq --no-install-recommends docker.io debootstrap >/dev/null \
        || skip "apt-get could not install docker.io/debootstrap"
fi
DOCKER=$(DOCKER=${DOCKER:-docker} docker/buildkit-docker.sh) || skip "no docker client that builds with BuildKit"
export DOCKER

started_pid=""
stop_engine() {
    if [[ -n "$started_pid" && -z "${KEEP:-}" ]]; then
        kill "$started_pid" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$started_pid" 2>/dev/null || break; sleep 1; done
    fi
}
if ! $DOCKER info >/dev/null 2>&1; then
    is_root || skip "no Docker engine reachable and not root, so none can be started here"
    command -v dockerd >/dev/null || skip "no dockerd binary"
    # A dockerd killed without cleanup (end of a session) leaves its pid file behind: remove it if stale.
    if [[ -f /var/run/docker.pid ]] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    log=${TMPDIR:-/tmp}/satdet-dockerd.log
    say "starting dockerd (log: $log)"
    dockerd >"$log" 2>&1 &
    started_pid=$!
    for _ in $(seq 60); do $DOCKER info >/dev/null 2>&1 && break; sleep 1; done
    if ! $DOCKER info >/dev/null 2>&1; then
        tail -n 20 "$log" >&2 || true
        stop_engine
        skip "dockerd did not start (log above)"
    fi
fi
trap stop_engine EXIT
say "engine $($DOCKER version --format '{{.Server.Version}}'), client $DOCKER"
# A cold CPU build needs about 7 GB (pip cache, the dependency layer, its copy, the export).
root_dir=$($DOCKER info --format '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)
free_gb=$(df -P -BG "$root_dir" 2>/dev/null | awk 'NR == 2 {print int($4)}')
if [[ -n "$free_gb" && "$free_gb" -lt ${CONTAINER_TEST_MIN_FREE_GB:-10} ]]; then
    stop_engine
    skip "only ${free_gb} GB free under $root_dir, a build needs about 7 (CONTAINER_TEST_MIN_FREE_GB)"
fi

# ------------------------------------------------------------------------------------------ 2. base
if [[ -z "${PYTHON_IMAGE:-}" ]]; then
    PYTHON_IMAGE=satdet-base:bookworm
    if ! $DOCKER image inspect "$PYTHON_IMAGE" >/dev/null 2>&1; then
        is_root || skip "no base image $PYTHON_IMAGE and debootstrap needs root (set PYTHON_IMAGE=...)"
        timed base env BASE_IMAGE="$PYTHON_IMAGE" docker/debian-base.sh || { bad "base image"; exit 1; }
    fi
fi
say "base $PYTHON_IMAGE"

# ------------------------------------------------------------------------------------------ 3. build
PIP_CA=${PIP_CA-/etc/ssl/certs/ca-certificates.crt}
[[ -z "$PIP_CA" || -s "$PIP_CA" ]] || PIP_CA=""
IMAGE_TAG=satdet:container-test-cpu
build_log=${TMPDIR:-/tmp}/satdet-container-build.log
build() {  # the builder's progress goes to $build_log; its last lines are shown when the build fails
    if ! make --no-print-directory "$1" PYTHON_IMAGE="$PYTHON_IMAGE" PIP_CA="$PIP_CA" PIP_CONF="${PIP_CONF:-}" \
        DOCKER="$DOCKER" DOCKER_BUILD_ARGS="--progress=plain $2" >"$build_log" 2>&1; then
        tail -n 40 "$build_log" >&2
        return 1
    fi
    python3 - "$build_log" <<'EOF' || true
import re, sys
name, state = {}, {}
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"#(\d+) (\[(?!internal).*|exporting to image)", line)
    if m:
        name.setdefault(m[1], m[2][:90])
    m = re.match(r"#(\d+) (CACHED|DONE ([0-9.]+)s)", line)
    if m and m[1] in name:
        state[m[1]] = "cached" if m[2] == "CACHED" else f"{float(m[3]):.1f} s"
for k in sorted(state, key=int):
    print(f"  | {state[k]:>8}  {name[k]}")
EOF
}
if ! timed build_cpu build image-cpu "-t $IMAGE_TAG"; then
    bad "build of the CPU image"; say "$passed passed, $failed failed"; exit 1
fi
ok "CPU image built in ${secs[build_cpu]} s"
mb() { $DOCKER image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f", $1/1e6}'; }
size_cpu=$(mb "$IMAGE_TAG")
label() { $DOCKER image inspect -f "{{index .Config.Labels \"$1\"}}" "$IMAGE_TAG"; }
check "label base.name = $PYTHON_IMAGE" test "$(label org.opencontainers.image.base.name)" = "$PYTHON_IMAGE"
check "label revision = $(git rev-parse --short=12 HEAD)*" \
    bash -c "[[ '$(label org.opencontainers.image.revision)' == $(git rev-parse --short=12 HEAD)* ]]"
check "label variant = cpu" test "$(label io.satdet.variant)" = cpu
check "image user is not root" bash -c "u=\$($DOCKER image inspect -f '{{.Config.User}}' $IMAGE_TAG); [[ -n \$u && \$u != 0 && \$u != root ]]"
$DOCKER run --rm --entrypoint pip "$IMAGE_TAG" freeze --all >"${TMPDIR:-/tmp}/satdet-image-freeze.txt" 2>/dev/null || true
check "every package in the image is pinned by requirements/constraints.txt, at that version" python3 - \
    "${TMPDIR:-/tmp}/satdet-image-freeze.txt" requirements/constraints.txt <<'EOF'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = dict(l.strip().split("==") for l in open(sys.argv[2]) if "==" in l and not l.startswith("#"))
pins = {norm(k): v for k, v in pins.items()}
got = dict(l.strip().split("==") for l in open(sys.argv[1]) if "==" in l)
assert got, "pip freeze in the image printed nothing"
bad = [f"{k}=={v} (pin {pins.get(norm(k))})" for k, v in got.items() if norm(k) != "satdet" and pins.get(norm(k)) != v]
assert not bad, bad
assert "tensorflow-cpu" in map(norm, got) and not any(norm(k).startswith("nvidia-") for k in got), "not a CPU image"
EOF

size_gpu=""
if [[ -n "${CONTAINER_TEST_GPU:-}" ]]; then
    if timed build_gpu build image "-t satdet:container-test-gpu"; then
        size_gpu=$(mb satdet:container-test-gpu); ok "GPU image built in ${secs[build_gpu]} s"
    else
        bad "build of the GPU image"
    fi
fi

# ------------------------------------------------------------------------------------------ 4. run
RUN_UID=$(id -u) RUN_GID=$(id -g)
if is_root; then RUN_UID=${CONTAINER_TEST_UID:-4321} RUN_GID=${CONTAINER_TEST_GID:-4321}; fi
work=$(mktemp -d "${TMPDIR:-/tmp}/satdet-container-test.XXXXXX")
cleanup() { [[ -n "${KEEP:-}" ]] || rm -rf "$work"; stop_engine; }
trap cleanup EXIT
mkdir -p "$work/data"
cp -r configs "$work/configs"
cp -r data/neon-trees "$work/data/neon-trees"
is_root && chown -R "$RUN_UID:$RUN_GID" "$work"
say "project folder $work mounted at /work, uid $RUN_UID:$RUN_GID"
drun() { $DOCKER run --rm --user "$RUN_UID:$RUN_GID" -v "$work":/work --shm-size 1g "$IMAGE_TAG" "$@"; }

if timed doctor drun doctor >"$work/doctor.txt" 2>&1 && drun doctor --json >"$work/doctor.json" 2>/dev/null; then
    sed 's/^/  | /' "$work/doctor.txt"
    check "doctor: tensorflow imports, no GPU here" python3 -c '
import json, sys; d = json.load(open(sys.argv[1])); assert d["tensorflow"]["version"] and d["tensorflow"]["gpus"] == [], d' \
        "$work/doctor.json"
else
    cat "$work/doctor.txt" >&2; bad "satdet doctor"
fi

steps=(-s train.steps=4 -s train.log_every=1 -s train.checkpoint_every=4 -s train.eval_every=0
       -s train.schedule.warmup_steps=1 -s train.time_budget_minutes=10 -s model.weights=none)
if timed run drun run configs/demo.yaml "${steps[@]}" >"$work/run.log" 2>&1; then
    ok "satdet run configs/demo.yaml (4 steps) in ${secs[run]} s"
else
    tail -n 40 "$work/run.log" >&2; bad "satdet run configs/demo.yaml (log above)"
fi
rd=$work/runs/demo
check "run folder: config.yaml" test -s "$rd/config.yaml"
check "run folder: tiles" bash -c "[[ -n \"\$(ls -A '$rd/tiles' 2>/dev/null)\" ]]"
check "run folder: model/export" bash -c "[[ -n \"\$(ls -A '$rd/model/export' 2>/dev/null)\" ]]"
check "run folder: eval/metrics.json" python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$rd/eval/metrics.json"

scene=data/neon-trees/OSBS_029.tif
if timed predict drun predict runs/demo/model "$scene" --out predictions/OSBS_029.geojson >"$work/predict.log" 2>&1; then
    ok "satdet predict $scene in ${secs[predict]} s"
else
    tail -n 30 "$work/predict.log" >&2; bad "satdet predict"
fi
check "GeoJSON on the host" python3 -c '
import json, sys; g = json.load(open(sys.argv[1])); assert g["type"] == "FeatureCollection", g.get("type")
print("container-test:      %d features" % len(g["features"]))' "$work/predictions/OSBS_029.geojson"

others=$(find "$work/runs" "$work/predictions" "$work/.prefect" \( ! -uid "$RUN_UID" -o ! -gid "$RUN_GID" \) \
         -printf '%u:%g %p\n' 2>/dev/null | head -n 5 || true)
nfiles=$(find "$work/runs" "$work/predictions" "$work/.prefect" 2>/dev/null | wc -l)
check "all $nfiles files written belong to $RUN_UID:$RUN_GID" test -z "$others"
[[ -z "$others" ]] || printf '  | %s\n' "$others"

# Keep the disk in check across runs: the per-revision tag `make image-cpu` added goes (this run's image
# stays as $IMAGE_TAG and satdet:<version>-cpu, which is what keeps the layer cache), and so do the
# satdet images earlier runs left untagged.
rev_tag=$($DOCKER image inspect -f '{{range .RepoTags}}{{println .}}{{end}}' "$IMAGE_TAG" | grep -E -- '-cpu$' \
          | grep -v -E ':(container-test|[0-9]+\.[0-9]+\.[0-9]+)-cpu$' || true)
[[ -z "$rev_tag" ]] || $DOCKER rmi $rev_tag >/dev/null || true
$DOCKER image prune -f --filter label=org.opencontainers.image.title=satdet >/dev/null || true

# ------------------------------------------------------------------------------------------ summary
secs[total]=$((SECONDS - t0))
summary=$(for k in "${!secs[@]}"; do printf '"%s_s": %s, ' "$k" "${secs[$k]}"; done)
summary="{${summary}\"image_cpu_mb\": $size_cpu${size_gpu:+, \"image_gpu_mb\": $size_gpu}, \"base\": \"$PYTHON_IMAGE\"}"
say "timings $summary"
[[ -z "${KEEP:-}" ]] || say "kept $work"
say "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
