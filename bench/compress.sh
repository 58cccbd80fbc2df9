#!/usr/bin/env bash
# Benchmark (not a test): a secondary's catch-up of compressible data (text and zeros) over a
# 100 Mbit/s link, with the fetch stream's compression off, lz4 and zstd; the peer is iperf3
# over the same link in the same run. Nothing here passes or fails on absolute numbers.
#
#   bench/compress.sh [DIR]         DIR: where the files go (default /var/tmp)
#
# The link: two network namespaces joined by one veth pair, tbf at RATE on both ends' egress
# (as crates/testkit/src/lab.rs limits a host's link), a (10.78.N.1, primary) and b (10.78.N.2,
# secondary). Each round: iperf3 from a to b for a few seconds (the link's real rate), then for
# each method: b pauses fetching, a takes BURST bytes of the mix through NBD (qemu-io) and
# writes them back, the cluster setting is made (`set-global-enabled-net-compressions`), b
# resumes fetching (a new fetch session, which negotiates the method) and is timed until
# `wait-resource r uptodate`. Reported: the effective rate (burst bytes / catch-up time) against
# iperf3's rate (target: ≥ 2x with compression), and the bytes on the wire against the raw
# bytes from b's `view --json` (the counters the metrics export).
#
# The mix, per 64 KiB: 40 KiB of text (man pages and changelogs of this machine, troff and
# prose) and 24 KiB of zeros, as a filesystem full of documents and unused blocks might be.
#
# Env: BURST (512M), RATE (100, Mbit/s), ROUNDS (3), PORT (17800), IPERF_SECS (5), MARS_BIN
#      (directory holding marsd and marsadm; unset: a release build here), KEEP=1 (keep files).
# Needs root (network namespaces, tc).
set -euo pipefail
PARENT=${1:-${BENCH_DIR:-/var/tmp}}
BURST=${BURST:-512M}
RATE=${RATE:-100}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-17800}
IPERF_SECS=${IPERF_SECS:-5}
HERE=$(cd "$(dirname "$0")/.." && pwd)
MIB=1048576
. "$HERE/bench/lib.sh"

[ "$(id -u)" = 0 ] || { echo "bench: needs root (network namespaces, tc)"; exit 1; }
for t in qemu-io iperf3 jq bc numfmt tc ip cmp; do
  command -v $t >/dev/null || { echo "bench: $t is not installed (apt-get install qemu-utils iperf3 jq bc iproute2)"; exit 1; }
done
mars_binaries
BURST_B=$(numfmt --from=iec "$BURST")
[ $((BURST_B % MIB)) -eq 0 ] && [ "$BURST_B" -gt 0 ] || { echo "bench: BURST must be a multiple of 1M"; exit 1; }

mkdir -p "$PARENT"
DIR=$(mktemp -d "$PARENT/mars-bench-compress-XXXXXX")
N=$(( ($$ % 200) + 20 ))
NSA=mcmp-$$-a
NSB=mcmp-$$-b
IPA=10.78.$N.1
IPB=10.78.$N.2
declare -A PID
IPERFD=""
cleanup() {
  for h in "${!PID[@]}"; do kill "${PID[$h]}" 2>/dev/null || true; done
  for h in "${!PID[@]}"; do wait "${PID[$h]}" 2>/dev/null || true; done
  if [ -n "$IPERFD" ]; then kill "$IPERFD" 2>/dev/null || true; wait "$IPERFD" 2>/dev/null || true; fi
  ip netns del "$NSA" 2>/dev/null || true
  ip netns del "$NSB" 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "bench: kept $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM


# ---------------------------------------------------------------- the link
ip netns add "$NSA"
ip netns add "$NSB"
ip link add eth0 netns "$NSA" type veth peer name eth0 netns "$NSB"
ip -n "$NSA" addr add "$IPA/24" dev eth0
ip -n "$NSB" addr add "$IPB/24" dev eth0
for ns in "$NSA" "$NSB"; do
  # One TCP segment per packet, as on a real wire (tbf then shapes packets, not 64 KiB GSO
  # bursts).
  ip -n "$ns" link set eth0 gso_max_segs 1
  ip -n "$ns" link set lo up
  ip -n "$ns" link set eth0 up
  # A burst of ~10 ms at the rate, at least 64 KiB (as the lab does).
  burst=$(( RATE * 1000000 / 8 / 100 )); [ "$burst" -ge 65536 ] || burst=65536
  tc -n "$ns" qdisc replace dev eth0 root tbf rate "${RATE}mbit" burst "$burst" latency 50ms
done
for _ in $(seq 100); do ip netns exec "$NSA" ping -c1 -W1 "$IPB" >/dev/null 2>&1 && break; sleep 0.1; done

# ---------------------------------------------------------------- the data
echo "bench: making the $BURST text+zeros mix" >&2
TEXT=$DIR/text
( zcat -f /usr/share/man/man*/*.gz /usr/share/doc/*/changelog* 2>/dev/null || true ) \
  | head -c $((BURST_B * 5 / 8)) >"$TEXT"
[ -s "$TEXT" ] || { echo "bench: no text found under /usr/share/man or /usr/share/doc"; exit 1; }
python3 - "$TEXT" "$DIR/mix.img" "$BURST_B" <<'EOF'
import sys
text = open(sys.argv[1], 'rb').read()
size = int(sys.argv[3])
out = open(sys.argv[2], 'wb')
pos, written, zeros = 0, 0, bytes(24 << 10)
while written < size:
    chunk = text[pos:pos + (40 << 10)]
    if len(chunk) < 40 << 10:
        pos = 0
        chunk = text[:40 << 10]
    pos += 40 << 10
    block = (chunk + zeros)[:size - written]
    out.write(block)
    written += len(block)
EOF
rm -f "$TEXT"
MIXB=$(stat -c %s "$DIR/mix.img")
echo "bench: mix: $MIXB bytes; gzip -1 ratio $(calc "$MIXB / $(gzip -1 -c "$DIR/mix.img" | wc -c)" | cut -c1-4)" >&2

# ---------------------------------------------------------------- the cluster
adm() { local h=$1; shift; "$BIN/marsadm" --root "$DIR/$h/root" "$@"; }
start_host() {
  local h=$1 ns=$2 ip=$3
  mkdir -p "$DIR/$h"
  MARS_LOG=info ip netns exec "$ns" "$BIN/marsd" --root "$DIR/$h/root" --host "$h" \
    --listen "$ip:$PORT" 2>"$DIR/$h/marsd.log" &
  PID[$h]=$!
  for _ in $(seq 200); do
    [ -S "$DIR/$h/root/marsd.sock" ] && adm "$h" view >/dev/null 2>&1 && return 0
    kill -0 "${PID[$h]}" 2>/dev/null || break
    sleep 0.05
  done
  echo "bench: marsd $h did not come up:"; cat "$DIR/$h/marsd.log"; exit 1
}
fallocate -l "$BURST_B" "$DIR/a.img"
fallocate -l "$BURST_B" "$DIR/b.img"
start_host a "$NSA" "$IPA"
start_host b "$NSB" "$IPB"
adm a create-cluster >/dev/null
adm a create-resource r "$DIR/a.img" >/dev/null
adm b join-cluster "$IPA:$PORT" --token "$(adm a join-token)" >/dev/null
adm a --timeout 60 wait-cluster >/dev/null
adm b --timeout 60 wait-cluster >/dev/null
for _ in $(seq 400); do
  [ "$(adm b get-link resource-r/primary 2>/dev/null)" = a ] && break
  sleep 0.05
done
# The initial sync of an empty disk: equal chunks, little travels.
adm b join-resource r "$DIR/b.img" >/dev/null
adm b --timeout 600 wait-resource r uptodate >/dev/null

written_back() {
  for _ in $(seq 6000); do
    [ "$(adm a view-diskstate r 2>/dev/null)" = UpToDate ] && return 0
    sleep 0.05
  done
  echo "bench: a never wrote its log back to its disk"; adm a view r; exit 1
}
# b's fetch bytes from a: "wire raw".
fetched() {
  adm b --json view all | jq -r '[.members[] | select(.host == "a") | .streams[]
    | select(.stream == "fetch")] | first // {} | "\(.received_bytes // 0) \(.received_raw_bytes // 0)"'
}
setting() {
  case $1 in off) echo "" ;; lz4) echo COMPRESS_LZ4 ;; zstd) echo COMPRESS_ZSTD ;; esac
}

IPERFD_LOG=$DIR/iperf3.log
ip netns exec "$NSB" iperf3 -s -B "$IPB" -p $((PORT + 1)) >"$IPERFD_LOG" 2>&1 &
IPERFD=$!
sleep 0.5
iperf_mibs() {
  ip netns exec "$NSA" iperf3 -c "$IPB" -p $((PORT + 1)) -t "$IPERF_SECS" -J >"$DIR/iperf.json"
  calc "$(jq '.end.sum_received.bits_per_second' "$DIR/iperf.json") / 8 / $MIB"
}

declare -A RATES WIRE RAW
IPERFS=()
METHODS=(off lz4 zstd)
for round in $(seq "$ROUNDS"); do
  IPERFS+=("$(iperf_mibs)")
  echo "bench: round $round: iperf3 ${IPERFS[-1]} MiB/s" >&2
  for m in "${METHODS[@]}"; do
    adm b pause-fetch r >/dev/null
    adm b --timeout 30 wait-resource r fetch-off
    adm a set-global-enabled-net-compressions "$(setting "$m")" >/dev/null
    echo "bench: round $round, $m: writing the $BURST mix on a (b's fetch paused)" >&2
    qemu-io -f raw -c "write -s $DIR/mix.img 0 $BURST_B" "nbd+unix:///r?socket=$DIR/a/root/nbd.sock" >/dev/null
    written_back
    # Both hosts read the setting once a second.
    sleep 2
    read -r w0 r0 < <(fetched)
    s=$(now)
    adm b resume-fetch r >/dev/null
    adm b --timeout 3600 wait-resource r uptodate >/dev/null
    e=$(now)
    read -r w1 r1 < <(fetched)
    t=$(calc "$e - $s")
    RATES[$m]="${RATES[$m]:-} $(calc "$BURST_B / $MIB / $t")"
    WIRE[$m]=$(( ${WIRE[$m]:-0} + w1 - w0 ))
    RAW[$m]=$(( ${RAW[$m]:-0} + r1 - r0 ))
    echo "bench: round $round, $m: caught up in $(printf %.2f "$t") s ($(printf %.1f "$(calc "$BURST_B / $MIB / $t")") MiB/s; $((w1 - w0)) bytes on the wire for $((r1 - r0)) raw)" >&2
    adm a cron >/dev/null
  done
done
EQ=$(cmp -s "$DIR/a.img" "$DIR/b.img" && echo yes || echo NO)
adm a set-global-enabled-net-compressions "" >/dev/null

IPERF=$(median "${IPERFS[@]}")
echo
echo "catch-up of a ${BURST} text+zeros mix over a ${RATE} Mbit/s tbf link (veth between two netns), $ROUNDS rounds"
echo "iperf3 over the link: $(printf %.2f "$IPERF") MiB/s [$(spread "${IPERFS[@]}")]"
for m in "${METHODS[@]}"; do
  # shellcheck disable=SC2086
  med=$(median ${RATES[$m]})
  ratio=$(calc "${RAW[$m]} / (${WIRE[$m]} + (${WIRE[$m]} == 0))")
  printf '%-5s %8.2f MiB/s [%s]  %.2fx the link  wire ratio %.2f\n' "$m" "$med" \
    "$(spread ${RATES[$m]})" "$(calc "$med / $IPERF")" "$ratio"
  target=null
  [ "$m" = off ] || target=2
  # shellcheck disable=SC2086
  bench_record "compress-$m" "catch-up of text+zeros over ${RATE} Mbit/s, compression $m (wire ratio $(printf %.2f "$ratio"))" \
    MiB/s higher "$target" "iperf3 over the link" "${RATES[$m]}" "${IPERFS[*]}"
done
echo "disks equal after the last round: $EQ"
[ "$EQ" = yes ] || exit 1
