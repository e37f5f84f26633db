#!/usr/bin/env bash
# Runs every example of examples/examples twice: in process with no
# configuration, then on the servers scripts/services.sh started, through
# the committed file examples/servers.yaml (IMINFRA_CONFIG) with this
# machine's addresses as variables. Each must exit 0, except `db` in
# process: MySQL's handle has no in-process counterpart, so there it must
# refuse, naming the variable that gives it a server. Needs the servers
# up; builds the examples if needed.
#
#   scripts/examples.sh            # every example
#   scripts/examples.sh cache mq   # some
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ -f .services/env ] || { echo "[examples] no .services/env: run scripts/services.sh up" >&2; exit 1; }
set -a
# shellcheck disable=SC1091
. .services/env
set +a
for var in IMINFRA_ETCD_ENDPOINTS IMINFRA_REDIS_URL IMINFRA_MYSQL_URL IMINFRA_KAFKA_BROKERS; do
    [ -n "${!var:-}" ] || { echo "[examples] $var is not set in .services/env" >&2; exit 1; }
done

# The file's servers at this machine's addresses (lists as YAML flow lists).
on_servers() {
    IMINFRA_CONFIG=examples/servers.yaml \
    IMINFRA_ETCD__ENDPOINTS="[$IMINFRA_ETCD_ENDPOINTS]" \
    IMINFRA_REDIS__URLS="[$IMINFRA_REDIS_URL]" \
    IMINFRA_DB__URL="$IMINFRA_MYSQL_URL" \
    IMINFRA_KAFKA__BROKERS="[$IMINFRA_KAFKA_BROKERS]" \
    IMINFRA_METRICS__LISTEN=127.0.0.1:0 \
    "$@"
}

if [ "$#" -gt 0 ]; then
    names=("$@")
else
    names=()
    for f in examples/examples/*.rs; do names+=("$(basename "$f" .rs)"); done
fi
cargo build -q -p im-infra-examples --examples || exit 1
bin="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/examples"
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failed=0
for name in "${names[@]}"; do
    for where in memory servers; do
        t0=${EPOCHREALTIME/./}
        log="$logs/$name-$where.log"
        if [ "$where" = memory ]; then
            env -u IMINFRA_CONFIG RUST_LOG=error RUST_BACKTRACE=0 timeout 120 "$bin/$name" >"$log" 2>&1
        else
            on_servers env RUST_LOG=error RUST_BACKTRACE=0 timeout 120 "$bin/$name" >"$log" 2>&1
        fi
        rc=$?
        if [ "$name" = db ] && [ "$where" = memory ]; then
            # Expected: a refusal that says how to give it a server.
            if [ "$rc" -ne 0 ] && grep -q "IMINFRA_CONFIG" "$log"; then rc=0; where="memory (refused: no in-process database, as expected)"; else rc=1; fi
        fi
        ms=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
        if [ "$rc" -eq 0 ]; then
            printf '[examples] %-10s on %s ok (%d ms)\n' "$name" "$where" "$ms" >&2
        else
            printf '[examples] %-10s on %-7s FAILED (exit %d); its output:\n' "$name" "$where" "$rc" >&2
            sed 's/^/    /' "$log" | tail -30 >&2
            failed=1
        fi
    done
done
exit "$failed"
