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
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

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
    # The quick start must keep working on a fresh machine.
    if ! cargo run -q --example quickstart >/dev/null; then
        echo "[test] cargo run --example quickstart FAILED" >&2
        status=1
    fi
fi
if [ "$status" -eq 0 ]; then
    echo "[test] all tests passed (IMINFRA_REQUIRE_BACKENDS=all)" >&2
else
    echo "[test] tests FAILED (exit $status)" >&2
fi
exit "$status"
