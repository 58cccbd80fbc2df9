#!/usr/bin/env bash
# Benchmark (not a test): a secondary's catch-up over a long fat pipe (DELAY ms each way, RATE
# Mbit/s) against iperf3 over the very same path in the same run, alternating. Nothing here
# passes or fails on absolute numbers.
#
#   bench/longdistance.sh [DIR]     DIR: where the files go (default /var/tmp)
#
# The path: two network namespaces joined only by the lab's userspace "TAP wire"
# (`mars-wan-wire`, crates/testkit/src/bin: TAP `wan0` in each namespace, every frame held for
# DELAY ms by a forwarder, since this kernel has no netem) with a tbf of RATE on each wan0's
# egress (as crates/testkit/src/lab.rs's long-distance link). a (10.79.N.1) is the primary,
# b (10.79.N.2) the secondary. The namespaces get the TCP buffer limits docs/operations.md
# recommends for long-distance links, as far as they are per namespace (net.ipv4.tcp_rmem and
# tcp_wmem up to 32 MiB; net.core.rmem_max/wmem_max are machine-wide and left alone, so marsd
# keeps the kernel's autotuning, which then reaches 32 MiB).
#
# Each round: iperf3 from a to b for IPERF_SECS (one stream, as one fetch is one stream; and,
# for reference, PARALLEL streams), then b pauses fetching, a takes BURST random bytes through
# NBD (nbdcopy from nbdkit's random plugin) and writes them back, b resumes fetching and is
# timed until `wait-resource r uptodate`. Reported: BURST / catch-up time against iperf3's
# single-stream rate (target: >= 0.9x).
#
# Env: BURST (1G), DELAY (25, ms one way), RATE (1000, Mbit/s), MTU (1500), ROUNDS (3),
#      PORT (17810), IPERF_SECS (10), PARALLEL (4), MARS_BIN (directory holding marsd,
#      marsadm and mars-wan-wire; unset: a release build here), KEEP=1 (keep the files).
# Needs root (network namespaces, TAP, tc).
set -euo pipefail
PARENT=${1:-${BENCH_DIR:-/var/tmp}}
BURST=${BURST:-1G}
DELAY=${DELAY:-25}
RATE=${RATE:-1000}
MTU=${MTU:-1500}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-17810}
IPERF_SECS=${IPERF_SECS:-10}
PARALLEL=${PARALLEL:-4}
HERE=$(cd "$(dirname "$0")/.." && pwd)
MIB=1048576
. "$HERE/bench/lib.sh"
. "$HERE/bench/cluster.sh"

[ "$(id -u)" = 0 ] || { echo "bench: needs root (network namespaces, TAP, tc)"; exit 1; }
for t in nbdcopy nbdkit iperf3 jq bc numfmt tc ip cmp ping; do
  command -v $t >/dev/null || { echo "bench: $t is not installed (apt-get install libnbd-bin nbdkit iperf3 jq bc iproute2 iputils-ping)"; exit 1; }
done
if [ -z "${MARS_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$HERE/Cargo.toml" -p mars-daemon -p mars-cli
  # (a separate build: --bin would narrow the one above to that binary)
  cargo build --release --quiet --manifest-path "$HERE/Cargo.toml" -p mars-testkit --bin mars-wan-wire
fi
mars_binaries
WIRE=$BIN/mars-wan-wire
[ -x "$WIRE" ] || { echo "bench: $WIRE missing (cargo build --release -p mars-testkit --bin mars-wan-wire)"; exit 1; }
BURST_B=$(numfmt --from=iec "$BURST")
[ $((BURST_B % MIB)) -eq 0 ] && [ "$BURST_B" -gt 0 ] || { echo "bench: BURST must be a multiple of 1M"; exit 1; }

mkdir -p "$PARENT"
DIR=$(mktemp -d "$PARENT/mars-bench-ld-XXXXXX")
N=$(( ($$ % 200) + 20 ))
NSA=mld-$$-a
NSB=mld-$$-b
IPA=10.79.$N.1
IPB=10.79.$N.2
WIREPID=""
IPERFD=""
cleanup() {
  if [ -n "$CHILD" ]; then kill "$CHILD" 2>/dev/null || true; wait "$CHILD" 2>/dev/null || true; fi
  stop_hosts
  if [ -n "$IPERFD" ]; then kill "$IPERFD" 2>/dev/null || true; wait "$IPERFD" 2>/dev/null || true; fi
  if [ -n "$WIREPID" ]; then kill "$WIREPID" 2>/dev/null || true; wait "$WIREPID" 2>/dev/null || true; fi
  ip netns del "$NSA" 2>/dev/null || true
  ip netns del "$NSB" 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "bench: kept $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- the path
ip netns add "$NSA"
ip netns add "$NSB"
for ns in "$NSA" "$NSB"; do
  ip -n "$ns" link set lo up
  # Per namespace: the autotuning maxima of docs/operations.md's long-distance settings.
  ip netns exec "$ns" sysctl -q -w net.ipv4.tcp_rmem="4096 131072 33554432" net.ipv4.tcp_wmem="4096 16384 33554432"
done
"$WIRE" "$NSA" "$NSB" "$IPA/24" "$IPB/24" "$DELAY" "$RATE" "$MTU" >"$DIR/wire.out" 2>"$DIR/wire.err" &
WIREPID=$!
for _ in $(seq 200); do grep -q ready "$DIR/wire.out" 2>/dev/null && break; kill -0 "$WIREPID" 2>/dev/null || break; sleep 0.05; done
grep -q ready "$DIR/wire.out" || { echo "bench: the wire did not come up:"; cat "$DIR/wire.err"; exit 1; }
for _ in $(seq 100); do ip netns exec "$NSA" ping -c1 -W1 "$IPB" >/dev/null 2>&1 && break; sleep 0.1; done
RTT=$(ip netns exec "$NSA" ping -c5 -i0.2 -q "$IPB" | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')
CC=$(ip netns exec "$NSA" sysctl -n net.ipv4.tcp_congestion_control)
echo "bench: path $IPA -> $IPB: ping RTT ${RTT:-?} ms, $RATE Mbit/s tbf, MTU $MTU, congestion control $CC" >&2

# ---------------------------------------------------------------- the cluster
PART=$DIR
HOST_NS=([a]=$NSA [b]=$NSB)
HOST_IP=([a]=$IPA [b]=$IPB)
fallocate -l "$BURST_B" "$DIR/a.img"
fallocate -l "$BURST_B" "$DIR/b.img"
cluster_with_resource "$PORT" "$DIR/a.img"
# The initial sync of an empty disk: equal chunks, little travels.
adm b join-resource r "$DIR/b.img" >/dev/null
uptodate_or_die b 3600

ip netns exec "$NSB" iperf3 -s -B "$IPB" -p $((PORT + 1)) >"$DIR/iperf3.log" 2>&1 &
IPERFD=$!
for _ in $(seq 100); do ip netns exec "$NSA" bash -c "echo >/dev/tcp/$IPB/$((PORT + 1))" 2>/dev/null && break; sleep 0.05; done
# iperf_mibs STREAMS: iperf3's received rate from a to b, in MiB/s.
iperf_mibs() {
  ip netns exec "$NSA" iperf3 -c "$IPB" -p $((PORT + 1)) -t "$IPERF_SECS" -P "$1" -J >"$DIR/iperf.json"
  calc "$(jq '.end.sum_received.bits_per_second' "$DIR/iperf.json") / 8 / $MIB"
}

IPERFS=(); IPERFPS=(); RATES=()
for round in $(seq "$ROUNDS"); do
  IPERFS+=("$(iperf_mibs 1)")
  IPERFPS+=("$(iperf_mibs "$PARALLEL")")
  echo "bench: round $round: iperf3 ${IPERFS[-1]} MiB/s (1 stream), ${IPERFPS[-1]} MiB/s ($PARALLEL streams)" >&2
  adm b pause-fetch r >/dev/null
  adm b --timeout 30 wait-resource r fetch-off
  echo "bench: round $round: writing the $BURST burst on a (b's fetch paused)" >&2
  bg nbdcopy --flush -- [ nbdkit random "$BURST_B" seed="$round" ] "nbd+unix:///r?socket=$DIR/a/root/nbd.sock"
  written_back
  s=$(now)
  adm b resume-fetch r >/dev/null
  uptodate_or_die b 3600
  e=$(now)
  t=$(calc "$e - $s")
  RATES+=("$(calc "$BURST_B / $MIB / $t")")
  echo "bench: round $round: caught up in $(printf %.2f "$t") s ($(printf %.1f "${RATES[-1]}") MiB/s)" >&2
  # Rotate, so that the replayed logfiles go before the next burst.
  adm a cron >/dev/null
done
stop_hosts
EQ=$(cmp -s "$DIR/a.img" "$DIR/b.img" && echo yes || echo NO)

IPERF=$(median "${IPERFS[@]}")
IPERFP=$(median "${IPERFPS[@]}")
MED=$(median "${RATES[@]}")
echo
echo "catch-up of a $BURST random burst over $DELAY ms each way (ping RTT ${RTT:-?} ms), $RATE Mbit/s, MTU $MTU, $CC; $ROUNDS rounds"
printf 'iperf3, 1 stream:          %8.2f MiB/s [%s]\n' "$IPERF" "$(spread "${IPERFS[@]}")"
printf 'iperf3, %d streams:         %8.2f MiB/s [%s]\n' "$PARALLEL" "$IPERFP" "$(spread "${IPERFPS[@]}")"
printf 'mars catch-up (1 stream):  %8.2f MiB/s [%s]   %.2fx iperf3 1 stream, %.2fx %d streams\n' \
  "$MED" "$(spread "${RATES[@]}")" "$(calc "$MED / $IPERF")" "$(calc "$MED / $IPERFP")" "$PARALLEL"
echo "disks equal after the last round: $EQ"
bench_record longdistance "catch-up of a $BURST burst, ${DELAY} ms each way, $RATE Mbit/s (TAP wire + tbf)" \
  MiB/s higher 0.9 "iperf3 over the same path, 1 stream" "${RATES[*]}" "${IPERFS[*]}"
bench_record longdistance-parallel "the same against iperf3 with $PARALLEL streams" \
  MiB/s higher null "iperf3 -P $PARALLEL over the same path" "${RATES[*]}" "${IPERFPS[*]}"
[ "$EQ" = yes ] || exit 1
