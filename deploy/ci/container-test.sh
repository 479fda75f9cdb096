#!/usr/bin/env bash
# The container image, built and run for real, and tested like the product it
# ships (issue 11). As root, with podman, on loopback only:
#
#   1. make (or reuse) a local Debian bookworm base image with debootstrap
#      (no registry is reachable here; EDGE_BASE=debian:bookworm-slim skips this
#      where one is; EDGE_FRESH_BASE=1 remakes it, as on a fresh machine);
#   2. build the image from git HEAD (EDGE_CONTEXT=. builds the working tree);
#   3. inspect it: user, healthcheck, no compiler, no pip, no tests;
#   4. generate a throwaway federation (deploy/example/make-certs.py), start an
#      MTLS echo pool on the host and run the image with --read-only and no
#      tmpfs at all, no capabilities, its own non-root user, the example
#      configuration, certificates and federation_policies/ mounted read-only
#      under /etc/edge, host networking on free loopback ports;
#   5. from outside: a trusted partner relays, a stranger is refused (and the
#      gateway says unknown_ca), /healthz /readyz /metrics answer, the image's
#      HEALTHCHECK passes, a partner folder dropped into the mounted directory
#      works without a restart, and `podman stop` drains a live connection
#      and the container exits 0.
#
# Every step is bounded by `timeout`; a trap removes the container, the pool
# and the temporary files. Exit 0 all passed, 1 a check failed, 77 podman
# cannot work on this machine (the reason is printed; .ci/run treats it as a
# skip). The settings podman needs here are deploy/ci/containers.conf and
# storage.conf (see those files for why).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD

export CONTAINERS_CONF="$REPO/deploy/ci/containers.conf"
export CONTAINERS_STORAGE_CONF="$REPO/deploy/ci/storage.conf"
IMAGE=${EDGE_IMAGE:-localhost/edge:ci}
LOCAL_BASE=${EDGE_LOCAL_BASE:-localhost/debian-bookworm-minbase:local}  # made here if absent
BASE=${EDGE_BASE:-$LOCAL_BASE}
NAME=edge-ci-$$
PYTHON=${PYTHON:-$(command -v python || command -v python3)}

RUN=$(mktemp -d /tmp/edge-container-test.XXXXXX)
POOL_PID=""
FAILED=0
step_started=0

cleanup() {
  local status=$?
  set +e
  if podman container exists "$NAME" 2>/dev/null; then
    if [ "$status" -ne 0 ] || [ "$FAILED" -ne 0 ]; then
      echo "-- last 40 log lines of $NAME:"
      timeout 20 podman logs --tail 40 "$NAME" 2>&1 | sed 's/^/   /'
    fi
    timeout 60 podman rm -f -t 0 "$NAME" >/dev/null 2>&1
  fi
  [ -n "$POOL_PID" ] && kill "$POOL_PID" 2>/dev/null && wait "$POOL_PID" 2>/dev/null
  rm -rf "$RUN"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '%s\n' "$*"; }
step() {
  step_started=$(date +%s)
  say ""
  say "== $*"
}
check() {  # check DESCRIPTION -- COMMAND...: run it, print ok/FAIL, count failures
  local what=$1
  shift 2
  if "$@"; then
    say "   ok: $what"
  else
    say "   FAIL: $what"
    FAILED=$((FAILED + 1))
  fi
}
skip() {
  say "SKIP: container test: $*"
  trap - EXIT
  rm -rf "$RUN"
  exit 77
}
# Helpers run on the host against the same code the image is built from.
helper() { PYTHONPATH="$CONTEXT" timeout "${HELPER_TIMEOUT:-60}" "$PYTHON" "$@"; }

# --- 0. can podman work here? ---------------------------------------------------
step "0. preflight: podman on this machine"
if ! command -v podman >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    skip "podman/debootstrap are missing and cannot be installed (needs root and apt-get)"
  fi
  say "   installing podman buildah runc debootstrap uidmap (apt-get)"
  if ! { timeout 600 apt-get update -qq >/dev/null \
    && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq \
      podman buildah runc debootstrap uidmap >/dev/null; }; then
    skip "apt-get could not install podman"
  fi
fi
if [ "$(id -u)" -ne 0 ]; then
  skip "not root: these settings (vfs storage under /var/lib/containers) need root"
fi
if ! info=$(timeout 60 podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' 2>&1); then
  skip "podman info fails here: $info"
fi
say "   podman $(podman --version | awk '{print $3}'), runtime and storage: $info"

# --- 1. base image ----------------------------------------------------------------
step "1. base image $BASE"
if [ "$BASE" != "$LOCAL_BASE" ]; then
  say "   using $BASE as given by EDGE_BASE"
elif [ -z "${EDGE_FRESH_BASE:-}" ] && timeout 60 podman image exists "$LOCAL_BASE"; then
  say "   reusing $LOCAL_BASE (made by debootstrap earlier; podman rmi it to remake)"
else
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  say "   debootstrap --variant=minbase bookworm from $mirror"
  timeout 900 debootstrap --variant=minbase bookworm "$RUN/rootfs" "$mirror" >"$RUN/debootstrap.log" 2>&1 \
    || { tail -20 "$RUN/debootstrap.log"; say "FAIL: debootstrap"; exit 1; }
  timeout 600 tar -C "$RUN/rootfs" -c . | timeout 600 podman import - "$LOCAL_BASE" >"$RUN/import.log" 2>&1 \
    || { cat "$RUN/import.log"; say "FAIL: podman import"; exit 1; }
  rm -rf "$RUN/rootfs"
  say "   made $LOCAL_BASE in $(($(date +%s) - step_started)) s"
fi

# --- 2. build -------------------------------------------------------------------------
step "2. build $IMAGE"
if [ -z "${EDGE_CONTEXT:-}" ] && ! git -C "$REPO" rev-parse --verify -q HEAD >/dev/null 2>&1; then
  EDGE_CONTEXT=$REPO  # not a git checkout: the files as they are
fi
if [ -n "${EDGE_CONTEXT:-}" ]; then
  CONTEXT=$(cd "$EDGE_CONTEXT" && pwd)
  say "   context: $CONTEXT (working tree as it is)"
else
  CONTEXT="$RUN/context"
  mkdir -p "$CONTEXT"
  git -C "$REPO" archive --format=tar HEAD | tar -C "$CONTEXT" -x
  say "   context: git HEAD $(git -C "$REPO" rev-parse --short HEAD) (uncommitted changes are not in it; EDGE_CONTEXT=. builds them)"
fi
build_args=(--build-arg "BASE=$BASE")
volumes=()
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
  # The host's CA bundle, for a build behind a TLS-intercepting proxy.
  volumes=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro)
  build_args+=(--build-arg PIP_CERT=/run/host-ca.crt)
fi
[ -n "${PIP_INDEX_URL:-}" ] && build_args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
build_start=$(date +%s)
if ! timeout 1200 podman build --format docker --isolation chroot --network host \
  "${build_args[@]}" "${volumes[@]}" -t "$IMAGE" "$CONTEXT" >"$RUN/build.log" 2>&1; then
  tail -30 "$RUN/build.log"
  say "FAIL: podman build (log above)"
  exit 1
fi
BUILD_SECONDS=$(($(date +%s) - build_start))
size_bytes=$(timeout 60 podman image inspect --format '{{.Size}}' "$IMAGE")
IMAGE_MB=$(awk -v b="$size_bytes" 'BEGIN { printf "%.0f", b / 1000000 }')
base_bytes=$(timeout 60 podman image inspect --format '{{.Size}}' "$BASE" 2>/dev/null || echo 0)
BASE_MB=$(awk -v b="$base_bytes" 'BEGIN { printf "%.0f", b / 1000000 }')
say "   built in ${BUILD_SECONDS} s; image ${IMAGE_MB} MB (base ${BASE_MB} MB, so ${IMAGE_MB}-${BASE_MB} = $((IMAGE_MB - BASE_MB)) MB added)"

# --- 3. what is in the image ----------------------------------------------------------------
step "3. image contents and metadata"
inspect() { timeout 60 podman image inspect --format "$1" "$IMAGE"; }
# podman schedules HEALTHCHECKs with systemd timers; there is no systemd here,
# so `podman run` logs two harmless errors about it, filtered out below. Step 5
# runs the image's HEALTHCHECK itself with `podman healthcheck run`.
no_timer_noise() { grep -v 'unable to get systemd connection' >&2 || true; }
run_once() { timeout 60 podman run --rm --network none "$@" 2> >(no_timer_noise); }
in_image() { run_once --entrypoint /bin/sh "$IMAGE" -c "$1"; }
check "runs as 10001:10001 by default ($(inspect '{{.Config.User}}'))" -- \
  test "$(inspect '{{.Config.User}}')" = "10001:10001"
check "entrypoint $(inspect '{{json .Config.Entrypoint}}') cmd $(inspect '{{json .Config.Cmd}}')" -- \
  test "$(inspect '{{json .Config.Entrypoint}}{{json .Config.Cmd}}')" = '["edge"]["run","--config","/etc/edge/edge.toml"]'
check "HEALTHCHECK kept: $(inspect '{{json .Config.Healthcheck.Test}}')" -- \
  test -n "$(inspect '{{if .Config.Healthcheck}}{{.Config.Healthcheck.Test}}{{end}}')"
# shellcheck disable=SC2016  # Go template and in-container shell variables, not ours
check "stop signal $(inspect '{{.Config.StopSignal}}'), ports$(inspect '{{range $p, $_ := .Config.ExposedPorts}} {{$p}}{{end}}')" -- \
  test "$(inspect '{{.Config.StopSignal}}')" = SIGTERM
# shellcheck disable=SC2016
check "no compiler, pip or package cache (gcc cc make pip pip3, /var/lib/apt/lists, /root/.cache)" -- \
  in_image 'for t in gcc cc c++ make pip pip3; do command -v "$t" && exit 1; done;
            test -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" && ! test -e /root/.cache'
check "no tests, benchmarks or sources beyond the installed package" -- \
  in_image '! ls -d /opt/edge/lib/python3*/site-packages/tests /opt/edge/lib/python3*/site-packages/bench /src 2>/dev/null'
edge_help() {
  local out
  out=$(run_once "$IMAGE" --help) && [[ $out == *"run the gateway"* ]]
}
check "\`edge --help\` runs as the image's user" -- edge_help

# --- 4. run it ------------------------------------------------------------------------------
step "4. run $IMAGE read-only on loopback"
read -r EDGE_PORT METRICS_PORT POOL_PORT < <(helper -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
helper "$CONTEXT/deploy/example/make-certs.py" "$RUN/world" \
  --listen "127.0.0.1:$EDGE_PORT" --metrics "127.0.0.1:$METRICS_PORT" \
  --member "fe1.corp.example=127.0.0.1:$POOL_PORT" --owner 10001:10001 | sed 's/^/   /'
W=$RUN/world
PARTNERS=$W/partners
# The pool lives for the whole run (the cleanup trap stops it), not for one
# helper's 60 s: on a loaded machine the checks below take longer than that,
# and a pool killed half-way made the new-partner and drain checks fail.
HELPER_TIMEOUT=1800 helper "$CONTEXT/deploy/example/echo-pool.py" --listen "127.0.0.1:$POOL_PORT" \
  --cert "$W/pool/fe1.corp.example.pem" --key "$W/pool/fe1.corp.example.key" \
  --client-root "$W/pool/enterprise-root.pem" >"$RUN/pool.log" 2>&1 &
POOL_PID=$!
for _ in $(seq 50); do grep -q listening "$RUN/pool.log" && break; sleep 0.2; done
grep -q listening "$RUN/pool.log" || { cat "$RUN/pool.log"; say "FAIL: echo pool did not start"; exit 1; }
say "   echo pool (fe1.corp.example) on the host at 127.0.0.1:$POOL_PORT"
# --read-only-tmpfs=false: not even /tmp or /run is writable, proving the
# gateway writes nothing.
timeout 120 podman run -d --name "$NAME" --network host \
  --read-only --read-only-tmpfs=false --cap-drop ALL --security-opt no-new-privileges \
  -v "$W/edge.toml:/etc/edge/edge.toml:ro" \
  -v "$W/certs:/etc/edge/certs:ro" \
  -v "$W/federation_policies:/etc/edge/federation_policies:ro" \
  "$IMAGE" >/dev/null 2> >(no_timer_noise)
say "   podman run -d --name $NAME --network host --read-only --read-only-tmpfs=false --cap-drop ALL --security-opt no-new-privileges, /etc/edge/{edge.toml,certs,federation_policies} mounted :ro"
logs() { timeout 30 podman logs "$NAME" 2>/dev/null; }
for _ in $(seq 100); do
  logs | grep -q '"event":"\(gateway_started\|startup_failed\)"' && break
  sleep 0.3
done
check "gateway_started within 30 s (listening on 127.0.0.1:$EDGE_PORT, metrics 127.0.0.1:$METRICS_PORT)" -- \
  sh -c "timeout 30 podman logs $NAME 2>/dev/null | grep -q '\"event\":\"gateway_started\"'"
[ "$FAILED" -eq 0 ] || exit 1
check "process runs as uid 10001 ($(timeout 30 podman exec "$NAME" id 2>&1))" -- \
  test "$(timeout 30 podman exec "$NAME" id -u)" = 10001
check "root filesystem and /tmp are read-only inside" -- \
  timeout 30 podman exec "$NAME" sh -c '! touch /probe 2>/dev/null && ! touch /tmp/probe 2>/dev/null'

# --- 5. from outside -----------------------------------------------------------------------------
step "5. checks from the host"
EDGE=127.0.0.1:$EDGE_PORT
M=http://127.0.0.1:$METRICS_PORT
partner() { helper "$CONTEXT/deploy/ci/partner_check.py" "$@"; }
event() { logs | partner find-event "$@"; }

say "-- trusted partner fabrikam.example relays through the gateway to the pool"
out=$(partner relay --edge "$EDGE" --dir "$PARTNERS" --partner fabrikam.example --expect relayed) || FAILED=$((FAILED + 1))
say "   $out"
port=${out##*local port }
sleep 0.5
event --event connection_closed --peer-port "$port" --field partner=fabrikam.example \
  --field member=fe1.corp.example | sed 's/^/   /' || FAILED=$((FAILED + 1))

say "-- a stranger (a root nobody trusts) is refused"
out=$(partner relay --edge "$EDGE" --dir "$PARTNERS" --partner stranger.example --expect refused) || FAILED=$((FAILED + 1))
say "   $out"
port=${out##*local port }
sleep 0.5
event --event connection_rejected --peer-port "$port" --field reason=unknown_ca | sed 's/^/   /' \
  || FAILED=$((FAILED + 1))

say "-- health, readiness, metrics"
for path in healthz readyz; do
  out=$(partner http "$M/$path" --expect 200) || FAILED=$((FAILED + 1))
  say "   $out"
done
for series in 'edge_partners{state="enabled"}' \
  'edge_handshakes_total{direction="inbound",listener="federation",partner="fabrikam.example",result="ok"}' \
  'edge_handshakes_total{direction="inbound",listener="federation",partner="unknown",result="unknown_ca"}'; do
  out=$(partner metric "$M/metrics" "$series") || FAILED=$((FAILED + 1))
  say "   $out"
done

say "-- the image's HEALTHCHECK, run by podman inside the container"
if out=$(timeout 60 podman healthcheck run "$NAME" 2>&1); then
  say "   ok: podman healthcheck run: ${out:-healthy}"
else
  say "   FAIL: podman healthcheck run: $out"
  FAILED=$((FAILED + 1))
fi

say "-- a new partner (northwind.example) dropped into the mounted folder works without a restart"
out=$(partner relay --edge "$EDGE" --dir "$PARTNERS" --partner northwind.example --expect refused) || FAILED=$((FAILED + 1))
say "   before: $out"
# Copy under a hidden name (ignored by the gateway), then rename: the gateway
# never sees half a folder. This is how an operator should drop one in too.
cp -r "$PARTNERS/northwind.example" "$W/federation_policies/.northwind.example.tmp"
mv "$W/federation_policies/.northwind.example.tmp" "$W/federation_policies/northwind.example"
HELPER_TIMEOUT=60 partner relay --edge "$EDGE" --dir "$PARTNERS" --partner northwind.example \
  --expect relayed --within 20 >"$RUN/new-partner.out" || true
out=$(cat "$RUN/new-partner.out")
if [ "${out#ok:}" != "$out" ]; then
  say "   after:  $out"
  event --event policies_reloaded --field result=ok | sed 's/^/   /' || FAILED=$((FAILED + 1))
  starts=$(logs | grep -c '"event":"gateway_started"' || true)
  check "no restart: one gateway_started in the log ($starts), same process" -- test "$starts" = 1
else
  reloads=$(partner metric "$M/metrics" 'edge_policy_reloads_total{result="ok"}' 2>&1 || true)
  errors=$(partner metric "$M/metrics" 'edge_policy_reloads_total{result="error"}' 2>&1 || true)
  say "   after:  $out"
  say "   FAIL: the gateway did not pick up the new partner within 20 s ($reloads; $errors)"
  FAILED=$((FAILED + 1))
fi

say "-- podman stop drains: a held connection keeps relaying after SIGTERM, then exit 0"
HELPER_TIMEOUT=90 partner drain --edge "$EDGE" --dir "$PARTNERS" --partner fabrikam.example \
  --stop-cmd "timeout 60 podman stop -t 40 $NAME" --logs-cmd "timeout 30 podman logs $NAME" \
  --within 45 | sed 's/^/   /' || FAILED=$((FAILED + 1))
code=$(timeout 30 podman inspect --format '{{.State.ExitCode}}' "$NAME")
check "container exited with status $code" -- test "$code" = 0
event --event shutdown_started --field why=SIGTERM | sed 's/^/   /' || FAILED=$((FAILED + 1))
event --event gateway_stopped | sed 's/^/   /' || FAILED=$((FAILED + 1))

say ""
if [ "$FAILED" -ne 0 ]; then
  say "container test: FAILED ($FAILED check(s)); image $IMAGE ${IMAGE_MB} MB, built in ${BUILD_SECONDS} s"
  exit 1
fi
say "container test: PASSED; image $IMAGE ${IMAGE_MB} MB (on a ${BASE_MB} MB base), built in ${BUILD_SECONDS} s"
