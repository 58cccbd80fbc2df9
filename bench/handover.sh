#!/usr/bin/env bash
# Benchmark (not a test): how long a planned handover of an idle resource takes on loopback,
# two marsd on 127.0.0.1 (a) and 127.0.0.2 (b). Timed: `marsadm primary r` on the host taking
# over, from the command's start until it returns (the new primary serves the resource, the
# old one is secondary and follows it). The handovers alternate a→b, b→a, HANDOVERS times in
# all; the resource is idle (no writes in flight) but has been written once, so both hosts hold
# a log. No peer: the issue's aim is an absolute time (< 0.5 s), reported, never asserted.
#
#   bench/handover.sh [DIR]       DIR: where the files go (default /var/tmp).
#
# Env: HANDOVERS (10), PORT (17810), MARS_BIN (as bench/replication.sh), KEEP=1.
set -euo pipefail
PARENT=${1:-${BENCH_DIR:-/var/tmp}}
HANDOVERS=${HANDOVERS:-10}
PORT=${PORT:-17810}
HERE=$(cd "$(dirname "$0")/.." && pwd)
. "$HERE/bench/lib.sh"

for t in nbdcopy nbdkit jq bc; do
  command -v $t >/dev/null || { echo "bench: $t is not installed (apt-get install libnbd-bin nbdkit jq bc)"; exit 1; }
done
mars_binaries
. "$HERE/bench/cluster.sh"

mkdir -p "$PARENT"
DIR=$(mktemp -d "$PARENT/mars-bench-handover-XXXXXX")
cleanup() {
  if [ -n "$CHILD" ]; then kill "$CHILD" 2>/dev/null || true; wait "$CHILD" 2>/dev/null || true; fi
  stop_hosts
  if [ "${KEEP:-0}" = 1 ]; then echo "bench: kept $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PART=$DIR
fallocate -l 64M "$PART/a.img"
fallocate -l 64M "$PART/b.img"
cluster_with_resource "$PORT" "$PART/a.img"
adm b join-resource r "$PART/b.img" >/dev/null
bg nbdcopy --flush -- [ nbdkit random 64M seed=1 ] "nbd+unix:///r?socket=$PART/a/root/nbd.sock"
uptodate_or_die b 120

TIMES=()
from=a
for i in $(seq "$HANDOVERS"); do
  to=$([ "$from" = a ] && echo b || echo a)
  # Idle means settled: the taker has everything, nothing of the last handover is pending.
  uptodate_or_die "$to" 60
  s=$(now)
  adm "$to" --timeout 60 primary r >/dev/null
  e=$(now)
  TIMES+=("$(calc "$e - $s")")
  [ "$(adm "$to" view-role r)" = Primary ] || { echo "bench: $to is not primary after handover $i"; adm "$to" view r; exit 1; }
  echo "bench: handover $i $from→$to: $(printf '%.3f' "${TIMES[-1]}") s" >&2
  from=$to
done

MED=$(median "${TIMES[@]}")
printf 'planned handover of an idle resource, loopback: median %.3f s [%s] over %d handovers (aim < 0.5 s)\n' \
  "$MED" "$(spread "${TIMES[@]}")" "$HANDOVERS"
bench_record handover "planned handover, idle resource, loopback" s lower null "none (aim < 0.5 s)" "${TIMES[*]}" ""
