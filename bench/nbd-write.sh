#!/usr/bin/env bash
# Benchmark (not a test): marsd's NBD write path against qemu-nbd serving a raw file on the same
# disk, measured in one run, printed as ratios. Nothing here passes or fails on absolute numbers.
#
#   bench/nbd-write.sh [RUNS]        RUNS per measurement (default 3, median reported)
#
# Workloads (each run measures every server once, in turn):
#   fio --ioengine=nbd 4k random writes, queue depth 32, RUNTIME s, against
#     - marsd alone (one host, no secondary),
#     - marsd as the primary of three hosts (a 127.0.0.1, b .2, c .3 on loopback, as
#       bench/cluster.sh makes them) with b and c attached and replicating while fio runs; after
#       each run the time until both are up to date again is taken (the lag), and the three
#       disks are compared at the end,
#     - qemu-nbd --cache=none --aio=native (O_DIRECT, the fair "no page cache" peer) and, for
#       reference, qemu-nbd with its default writeback cache,
#     - the raw disk: fio libaio O_DIRECT on a plain file in the same directory (the limit: no
#       server, no network, no log);
#   nbdcopy --flush of SIZE (nbdkit pattern) sequentially, marsd alone and both qemu-nbd.
# All backing files are fallocated SIZE files in one directory on the disk under test; the
# three hosts share that disk (each writes its log and its disk there).
# Env: BENCH_DIR (parent directory, default /var/tmp, must be on the disk under test), SIZE
#      (2G), RUNTIME (20), PORT (10900; uses PORT..PORT+5), MARS_BIN (prebuilt marsd and marsadm).
set -euo pipefail
RUNS=${1:-${RUNS:-3}}
RUNTIME=${RUNTIME:-20}
PARENT=${BENCH_DIR:-/var/tmp}
SIZE=${SIZE:-2G}
PORT=${PORT:-10900}
HERE=$(cd "$(dirname "$0")/.." && pwd)
for t in fio nbdcopy nbdkit qemu-nbd jq cmp; do
  command -v $t >/dev/null || { echo "bench: $t is not installed (apt-get install fio libnbd-bin nbdkit qemu-utils jq)"; exit 1; }
done
. "$HERE/bench/lib.sh"
. "$HERE/bench/cluster.sh"
mars_binaries
mkdir -p "$PARENT"
DIR=$(mktemp -d "$PARENT/mars-bench-nbd-XXXXXX")
cleanup() {
  [ -n "${MARSD:-}" ] && kill "$MARSD" 2>/dev/null && wait "$MARSD" 2>/dev/null || true
  stop_hosts
  for p in "$DIR"/q*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Fully allocated backing files for everybody, so no server pays for block allocation.
PART=$DIR/three
mkdir -p "$PART"
for f in mars.img qnone.raw qwb.raw raw.dat three/a.img three/b.img three/c.img; do fallocate -l "$SIZE" "$DIR/$f"; done
"$BIN/marsd" --root "$DIR/root" --host bench --listen "127.0.0.1:$PORT" --nbd-listen "127.0.0.1:$((PORT + 1))" \
  2>"$DIR/marsd.log" &
MARSD=$!
for _ in $(seq 600); do [ -S "$DIR/root/marsd.sock" ] && break; sleep 0.05; done
"$BIN/marsadm" --root "$DIR/root" create-cluster >/dev/null
"$BIN/marsadm" --root "$DIR/root" create-resource bench "$DIR/mars.img" >/dev/null
qemu-nbd -f raw -t -b 127.0.0.1 -p $((PORT + 2)) --cache=none --aio=native --fork --pid-file="$DIR/qnone.pid" "$DIR/qnone.raw"
qemu-nbd -f raw -t -b 127.0.0.1 -p $((PORT + 3)) --fork --pid-file="$DIR/qwb.pid" "$DIR/qwb.raw"

# The three hosts: a primary with NBD over TCP like the others, b and c joined and up to date
# (the initial sync of empty disks moves little).
echo "bench: three hosts, b and c joining" >&2
PRIMARY_ARGS=(--nbd-listen "127.0.0.1:$((PORT + 5))")
cluster_with_resource $((PORT + 4)) "$PART/a.img" 3
adm b join-resource r "$PART/b.img" >/dev/null
adm c join-resource r "$PART/c.img" >/dev/null
uptodate_or_die b 600
uptodate_or_die c 600

declare -A URI=([marsd]=nbd://127.0.0.1:$((PORT + 1))/bench [marsd-2-secondaries]=nbd://127.0.0.1:$((PORT + 5))/r
  [qemu-nbd-cache=none]=nbd://127.0.0.1:$((PORT + 2)) [qemu-nbd-writeback]=nbd://127.0.0.1:$((PORT + 3)))
SERVERS=(marsd marsd-2-secondaries qemu-nbd-cache=none qemu-nbd-writeback raw-disk)
COPIERS=(marsd qemu-nbd-cache=none qemu-nbd-writeback)

# (lib.sh's median takes arguments; this one reads lines.)
median_of() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR+1)/2)]}'; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

fio_iops() {
  local target
  if [ "$1" = raw-disk ]; then
    target=(--ioengine=libaio --direct=1 --filename="$DIR/raw.dat")
  else
    target=(--ioengine=nbd --uri="${URI[$1]}")
  fi
  # JSON to a file: the nbd engine prints "connected" on stdout.
  fio --name=bench "${target[@]}" --rw=randwrite --bs=4k --iodepth=32 --size="$SIZE" \
      --time_based --runtime="$RUNTIME" --output-format=json --output="$DIR/fio.json" >/dev/null 2>&1
  jq '.jobs[0].write.iops' "$DIR/fio.json"
}
copy_mibs() {
  local s e
  s=$(date +%s.%N)
  nbdcopy --flush -- [ nbdkit pattern "$SIZE" ] "$1"
  e=$(date +%s.%N)
  echo "$(numfmt --from=iec "$SIZE") / 1048576 / ($e - $s)" | bc -l
}

# The single host's log written back, and the written-back logfiles rotated away.
mars_alone_settled() {
  written_back "$DIR/root" bench
  "$BIN/marsadm" --root "$DIR/root" cron >/dev/null
}
declare -A IOPS COPY
LAGS=()
for s in "${SERVERS[@]}"; do IOPS[$s]=""; COPY[$s]=""; done
for r in $(seq "$RUNS"); do
  for s in "${SERVERS[@]}"; do
    IOPS[$s]+="$(fio_iops "$s") "
    # The next server should not share the disk with this one's writeback of its log (nor
    # with the secondaries' catch-up).
    [ "$s" != marsd ] || mars_alone_settled
    if [ "$s" = marsd-2-secondaries ]; then
      # The secondaries replicated while fio ran; how far behind were they at its end?
      t0=$(now)
      uptodate_or_die b 3600
      uptodate_or_die c 3600
      LAGS+=("$(calc "$(now) - $t0")")
      written_back "$PART/a/root" r
      # Rotate, so that the replayed logfiles go before the next run.
      adm a cron >/dev/null
    fi
  done
  for s in "${COPIERS[@]}"; do
    COPY[$s]+="$(copy_mibs "${URI[$s]}") "
    [ "$s" != marsd ] || mars_alone_settled
  done
  echo "run $r/$RUNS done" >&2
done
stop_hosts
EQ=yes
for h in b c; do cmp -s "$PART/a.img" "$PART/$h.img" || EQ="NO ($h differs from a)"; done

printf '\n%-22s %14s %16s   (median of %s runs; all runs in brackets)\n' server "4k QD32 IOPS" "seq MiB/s" "$RUNS"
declare -A MI MC
for s in "${SERVERS[@]}"; do
  MI[$s]=$(echo "${IOPS[$s]}" | tr ' ' '\n' | { grep . || true; } | median)
  MC[$s]=$(echo "${COPY[$s]:-}" | tr ' ' '\n' | { grep . || true; } | median)
  printf '%-22s %14.0f %16s   [%s| %s]\n' "$s" "${MI[$s]}" "$([ -n "${MC[$s]}" ] && printf %.0f "${MC[$s]}" || echo -)" \
    "$(for v in ${IOPS[$s]}; do printf '%.0f ' "$v"; done)" "$(for v in ${COPY[$s]:-}; do printf '%.0f ' "$v"; done)"
done
echo
for p in qemu-nbd-cache=none qemu-nbd-writeback; do
  printf 'marsd / %-20s random 4k write: %.2fx   sequential: %.2fx\n' "$p" \
    "$(echo "${MI[marsd]} / ${MI[$p]}" | bc -l)" "$(echo "${MC[marsd]} / ${MC[$p]}" | bc -l)"
done
printf 'marsd with b and c replicating / qemu-nbd-cache=none: %.2fx   / raw disk: %.2fx   (alone / raw disk: %.2fx)\n' \
  "$(echo "${MI[marsd-2-secondaries]} / ${MI[qemu-nbd-cache=none]}" | bc -l)" \
  "$(echo "${MI[marsd-2-secondaries]} / ${MI[raw-disk]}" | bc -l)" "$(echo "${MI[marsd]} / ${MI[raw-disk]}" | bc -l)"
printf 'b and c up to date again %s s after fio ended (median; runs: %s); disks of a, b, c equal at the end: %s\n' \
  "$(median_of "${LAGS[@]}")" "${LAGS[*]}" "$EQ"

bench_record nbd-rand4k-2sec "NBD random 4k write QD32, two secondaries replicating (fio nbd)" IOPS higher 3 \
  "qemu-nbd --cache=none" "${IOPS[marsd-2-secondaries]}" "${IOPS[qemu-nbd-cache=none]}"
bench_record nbd-rand4k-2sec-raw "the same, fraction of the raw disk" IOPS higher null \
  "fio libaio direct on a plain file" "${IOPS[marsd-2-secondaries]}" "${IOPS[raw-disk]}"
bench_record nbd-rand4k "NBD random 4k write QD32 (fio nbd; no secondary)" IOPS higher null \
  "qemu-nbd --cache=none" "${IOPS[marsd]}" "${IOPS[qemu-nbd-cache=none]}"
bench_record nbd-rand4k-wb "NBD random 4k write QD32, vs page cache" IOPS higher null \
  "qemu-nbd writeback" "${IOPS[marsd]}" "${IOPS[qemu-nbd-writeback]}"
[ "$EQ" = yes ] || { echo "bench: the replicas differ after the runs"; exit 1; }
bench_record nbd-seq "NBD sequential $SIZE + flush (nbdcopy)" MiB/s higher 1 \
  "qemu-nbd --cache=none" "${COPY[marsd]}" "${COPY[qemu-nbd-cache=none]}"
