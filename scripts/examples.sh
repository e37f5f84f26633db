#!/usr/bin/env bash
# Runs every example of examples/examples twice: in process with no
# configuration, then on the servers scripts/services.sh started, through
# one variable (IMINFRA_CONFIG) naming a file written here from
# .services/env. Each must exit 0. Needs the servers up and built examples
# (cargo test --workspace builds them).
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

# The servers of this machine, in the shape of examples/servers.yaml.
list() { local IFS=,; local out="" x; for x in $1; do out+="\"$x\", "; done; echo "[${out%, }]"; }
SERVERS=.services/servers.yaml
cat > "$SERVERS" <<YAML
backends: { coord: etcd, cache: redis, ratelimit: redis, once: mysql, mq: kafka, uid: etcd }
etcd: { endpoints: $(list "$IMINFRA_ETCD_ENDPOINTS") }
redis: { urls: $(list "$IMINFRA_REDIS_URL") }
db: { url: "$IMINFRA_MYSQL_URL" }
kafka:
  brokers: $(list "$IMINFRA_KAFKA_BROKERS")
  topics:
    - { name: chat.events, partitions: 1, replication_factor: 1 }
    - { name: examples.events, partitions: 1, replication_factor: 1 }
    - { name: examples.orders, partitions: 3, replication_factor: 1 }
    - { name: examples.orders.dlq, partitions: 1, replication_factor: 1 }
metrics: { listen: "127.0.0.1:0" }
YAML

if [ "$#" -gt 0 ]; then
    names=("$@")
else
    names=()
    for f in examples/examples/*.rs; do names+=("$(basename "$f" .rs)"); done
fi
cargo build -q -p im-infra-examples --examples || exit 1
bin=${CARGO_TARGET_DIR:-target}/debug/examples
failed=0
for name in "${names[@]}"; do
    for where in memory servers; do
        t0=${EPOCHREALTIME/./}
        if [ "$where" = memory ]; then
            env -u IMINFRA_CONFIG RUST_LOG=error timeout 120 "$bin/$name" >"/tmp/example-$name-$where.log" 2>&1
        else
            IMINFRA_CONFIG="$SERVERS" RUST_LOG=error timeout 120 "$bin/$name" >"/tmp/example-$name-$where.log" 2>&1
        fi
        rc=$?
        ms=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
        if [ "$rc" -eq 0 ]; then
            printf '[examples] %-10s on %-7s ok (%d ms)\n' "$name" "$where" "$ms" >&2
        else
            printf '[examples] %-10s on %-7s FAILED (exit %d); its output:\n' "$name" "$where" "$rc" >&2
            sed 's/^/    /' "/tmp/example-$name-$where.log" | tail -30 >&2
            failed=1
        fi
    done
done
exit "$failed"
