#!/usr/bin/env bash
# The full test command: installs and starts the servers (etcd, Redis,
# MariaDB, tansu), runs every test of the workspace with
# IMINFRA_REQUIRE_BACKENDS=all (a backend without its server fails instead of
# being skipped), then stops the servers it started, also when the tests
# fail. Exits with the tests' status. Extra arguments go to `cargo test`.
#
#   scripts/test.sh
#   scripts/test.sh -p im-infra-redis --test conformance -- redis::lock::
#
# Servers that were already running (scripts/services.sh up) are left running.
#
# The containers pass runs every conformance runner (memory, noop, redis,
# redis-cluster, etcd, mysql, kafka) with each server runner's server in a
# container of its own (IMINFRA_SERVERS=containers, testcontainers), removed
# when the runner ends; it starts no local server. It first builds the
# images (scripts/images.sh build: about a minute the first time, under a
# second when they are up to date). Extra arguments go to `cargo test`.
#
#   scripts/test.sh --containers
#   IMINFRA_SERVERS=containers scripts/test.sh
#   scripts/test.sh --containers -- redis::lock::
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The conformance runners: every tests/conformance.rs of the workspace (each
# backend's and the wrapped-backend example's), and the Redis Cluster's
# tests/conformance_cluster.rs.
RUNNER_TESTS=(conformance conformance_cluster)

# Microseconds since the epoch.
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }
# Seconds, one decimal, since a now_us value.
secs_since() { local d=$(( $(now_us) - $1 )); printf '%d.%d' $(( d / 1000000 )) $(( d % 1000000 / 100000 )); }

# Passes cargo's output through, noting when each test binary starts and
# which backend it runs; prints each runner's wall time (its containers'
# start and removal included) at the end.
runner_times() {
    # A runner is named by its backend, from its first trial or container
    # line; by its test binary when it printed neither (every case filtered
    # out).
    local line name="" bin="" start="" summary=""
    while IFS= read -r line; do
        printf '%s\n' "$line"
        case "$line" in
            *"Running tests/"*)
                [ -z "$start" ] || summary+=$(printf '  %-14s %s s' "${name:-$bin}" "$(secs_since "$start")")$'\n'
                start=$(now_us) name="" bin=${line##*/} bin=${bin%)}
                ;;
            "[containers] "*": "*" ready at "*) [ -n "$name" ] || { name=${line#\[containers\] }; name=${name%%:*}; } ;;
            "test "*"::"*) [ -n "$name" ] || { name=${line#test }; name=${name%%::*}; } ;;
        esac
    done
    [ -z "$start" ] || summary+=$(printf '  %-14s %s s' "${name:-$bin}" "$(secs_since "$start")")$'\n'
    printf '[test] containers pass, wall time per runner (its containers started and removed):\n%s' "$summary" >&2
    printf '[test] containers pass: %s s in all (images and build included)\n' "$(secs_since "$CONTAINERS_T0")" >&2
}

# Removes containers of conformance runs whose runner process is gone (one
# killed before it could remove them); those of live runs are left alone.
sweep_containers() {
    local id run pid
    docker ps -a --filter label=im-infra.conformance \
        --format '{{.ID}} {{.Label "im-infra.conformance.run"}}' 2>/dev/null |
        while read -r id run; do
            pid=${run%%-*}
            if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
                docker rm -f -v "$id" >/dev/null 2>&1 && echo "[test] removed container $id left by a runner that is gone" >&2
            fi
        done
}

containers_pass() {
    CONTAINERS_T0=$(now_us)
    if ! scripts/images.sh build; then
        echo "[test] building the images failed (scripts/images.sh build); see above" >&2
        return 1
    fi
    sweep_containers
    # The containers, not servers named in the environment.
    unset IMINFRA_ETCD_ENDPOINTS IMINFRA_REDIS_URL IMINFRA_MYSQL_URL IMINFRA_KAFKA_BROKERS \
        IMINFRA_REDIS_CLUSTER_URLS
    export IMINFRA_SERVERS=containers IMINFRA_REQUIRE_BACKENDS=all
    # --workspace, not -p per package: the same features as the main pass,
    # so its build is reused (-p rebuilt a quarter of the workspace). The
    # wrapped-backend example's runner (on the in-process backend) runs too.
    local args=(--workspace) t status
    for t in "${RUNNER_TESTS[@]}"; do args+=(--test "$t"); done
    cargo test --no-fail-fast "${args[@]}" "$@" 2>&1 | runner_times
    status=${PIPESTATUS[0]}
    sweep_containers
    if [ "$status" -eq 0 ]; then
        echo "[test] every conformance runner passed with its servers in containers (IMINFRA_REQUIRE_BACKENDS=all)" >&2
    else
        echo "[test] the containers pass FAILED (exit $status)" >&2
    fi
    return "$status"
}

if [ "${1:-}" = "--containers" ]; then
    shift
    containers_pass "$@"
    exit $?
fi
case "${IMINFRA_SERVERS:-}" in
    containers | CONTAINERS)
        containers_pass "$@"
        exit $?
        ;;
esac

already_up=$(scripts/services.sh status | grep -c ': running' || true)
all=$(scripts/services.sh status | grep -c ': ' || true)
if ! scripts/services.sh up; then
    echo "[test] the servers could not be started; see above" >&2
    [ "$already_up" -eq "$all" ] || scripts/services.sh down
    exit 1
fi
if [ "$already_up" -ne "$all" ]; then
    trap 'scripts/services.sh down' EXIT
fi

# The images of the Docker cluster fault tests (idempotent: <1 s when up to date).
scripts/images.sh build etcd redis || echo "[test] scripts/images.sh build failed: the Docker cluster tests will fail" >&2

set -a
# shellcheck disable=SC1091
. .services/env
set +a
export IMINFRA_REQUIRE_BACKENDS=all

cargo test --workspace --no-fail-fast "$@"
status=$?
if [ "$#" -eq 0 ]; then
    # Every example (the quick start and one per capability) must keep
    # working: in process with no configuration, and on the servers with
    # one file.
    if ! scripts/examples.sh; then
        echo "[test] scripts/examples.sh FAILED" >&2
        status=1
    fi
fi
if [ "$status" -eq 0 ]; then
    echo "[test] all tests passed (IMINFRA_REQUIRE_BACKENDS=all)" >&2
else
    echo "[test] tests FAILED (exit $status)" >&2
fi
exit "$status"
