#!/usr/bin/env bash
# Benchmark (not a test): replicated metadata at scale. Three marsd on 127.0.0.1/2/3, 1,000
# resources' worth of keys (20 each, 20,000 keys) loaded on one host, then:
#   - how long until the other two hold all of it,
#   - how long one change takes to reach the farthest host (median of 20),
#   - CPU used by each idle daemon over 20 s.
# For scale: MARS stops at about 30 resources and 10 hosts per cluster.
#
#   bench/meta-scale.sh [RESOURCES]     default 1000
set -euo pipefail
N=${1:-1000}
HERE=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --quiet --manifest-path "$HERE/Cargo.toml" -p mars-daemon -p mars-cli
BIN=$HERE/target/release
DIR=$(mktemp -d /tmp/mars-meta-scale-XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
now() { date +%s.%N; }
adm() { local h=$1; shift; "$BIN/marsadm" --root "$DIR/$h" "$@"; }

i=1
for h in a b c; do
  "$BIN/marsd" --root "$DIR/$h" --host "$h" --listen "127.0.0.$i:17777" 2>"$DIR/$h.log" &
  PIDS+=($!)
  i=$((i+1))
done
for h in a b c; do for _ in $(seq 200); do [ -S "$DIR/$h/marsd.sock" ] && break; sleep 0.05; done; done
adm a create-cluster >/dev/null
adm b join-cluster 127.0.0.1:17777 --token "$(adm a join-token)" >/dev/null
# c joins through b, which needs the CA's key to issue tokens (docs/security.md).
cp "$DIR/a/tls/ca.key" "$DIR/b/tls/ca.key"
adm c join-cluster 127.0.0.2:17777 --token "$(adm b join-token)" >/dev/null
adm a --timeout 60 wait-cluster >/dev/null

KEYS=$((N * 20))
# Per resource: 8 shared keys (written on a) and 4 keys owned by each host (written by it).
gen() {
  local h=$1
  for r in $(seq -w 1 "$N"); do
    if [ "$h" = a ]; then
      for k in primary size sync-limit systemd-start systemd-stop systemd-want todo-attach todo-fetch; do
        echo "resource-r$r/$k v$r"
      done
    fi
    for k in data device replay version; do echo "resource-r$r/$k-$h v$r"; done
  done
}
t0=$(now)
LOADERS=()
for h in a b c; do
  gen "$h" | adm "$h" lowlevel-set-links &
  LOADERS+=($!)
done
for p in "${LOADERS[@]}"; do wait "$p"; done
t1=$(now)
lastr=$(printf "%0${#N}d" "$N")
for h in a b c; do
  for o in a b c; do
    until [ "$(adm "$h" get-link "resource-r$lastr/version-$o" 2>/dev/null)" = "v$lastr" ]; do sleep 0.02; done
  done
  until [ "$(adm "$h" get-link "resource-r$lastr/todo-fetch" 2>/dev/null)" = "v$lastr" ]; do sleep 0.02; done
done
t2=$(now)

lat=()
for j in $(seq 20); do
  s=$(now)
  adm a set-link bench/probe "p$j" >/dev/null
  until [ "$(adm c get-link bench/probe 2>/dev/null)" = "p$j" ]; do sleep 0.005; done
  e=$(now)
  lat+=("$(echo "($e - $s) * 1000" | bc -l)")
done
median=$(printf '%s\n' "${lat[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
worst=$(printf '%s\n' "${lat[@]}" | sort -g | tail -1)

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
declare -A before
for p in "${PIDS[@]}"; do before[$p]=$(ticks "$p"); done
sleep 20
printf '\n%d keys (%d resources x 20) on 3 hosts\n' "$KEYS" "$N"
printf 'load, each host its keys (48 KiB batches):      %.2f s\n' "$(echo "$t1 - $t0" | bc -l)"
printf 'until every host holds every key:              %.2f s after the load\n' "$(echo "$t2 - $t1" | bc -l)"
printf 'one change a -> c (via b), median of 20:       %.0f ms (worst %.0f ms; includes two marsadm calls per poll)\n' "$median" "$worst"
k=0
for h in a b c; do
  p=${PIDS[$k]}
  used=$(( $(ticks "$p") - before[$p] ))
  printf 'idle CPU of %s over 20 s:                        %.2f %% of one core\n' "$h" "$(echo "$used * 100 / $HZ / 20" | bc -l)"
  k=$((k+1))
done
printf 'metadata file size on a:                       %s\n' "$(du -h "$DIR/a/meta.redb" | cut -f1)"
