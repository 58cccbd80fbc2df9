#!/usr/bin/env bash
# Benchmark (not a test): marsd's NBD write path against qemu-nbd serving a raw file on the same
# disk, measured in one run, printed as ratios. Nothing here passes or fails on absolute numbers.
#
#   bench/nbd-write.sh [RUNS]        RUNS per measurement (default 3, median reported)
#
# Workloads (each against both servers, alternating):
#   fio --ioengine=nbd 4k random writes, queue depth 32, 20 s
#   nbdcopy --flush of 2 GiB (nbdkit pattern) sequentially
# Peer: qemu-nbd --cache=none --aio=native (O_DIRECT, the fair "no page cache" baseline) and,
# for reference, qemu-nbd with its default writeback cache.
# Env: BENCH_DIR (default /var/tmp/mars-bench, must be on the disk under test), SIZE (2G).
set -euo pipefail
RUNS=${1:-${RUNS:-3}}
RUNTIME=${RUNTIME:-20}
DIR=${BENCH_DIR:-/var/tmp/mars-bench}
SIZE=${SIZE:-2G}
HERE=$(cd "$(dirname "$0")/.." && pwd)
for t in fio nbdcopy nbdkit qemu-nbd jq; do
  command -v $t >/dev/null || { echo "bench: $t is not installed (apt-get install fio libnbd-bin nbdkit qemu-utils jq)"; exit 1; }
done
. "$HERE/bench/lib.sh"
if [ -z "${MARS_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$HERE/Cargo.toml" -p mars-daemon -p mars-cli
fi
BIN=${MARS_BIN:-${CARGO_TARGET_DIR:-$HERE/target}/release}
rm -rf "$DIR"; mkdir -p "$DIR"
cleanup() {
  [ -n "${MARSD:-}" ] && kill "$MARSD" 2>/dev/null && wait "$MARSD" 2>/dev/null || true
  for p in "$DIR"/q*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT

# Fully allocated backing files for everybody, so no server pays for block allocation.
fallocate -l "$SIZE" "$DIR/mars.img"; fallocate -l "$SIZE" "$DIR/qnone.raw"; fallocate -l "$SIZE" "$DIR/qwb.raw"
"$BIN/marsd" --root "$DIR/root" --host bench --listen 127.0.0.1:10900 --nbd-listen 127.0.0.1:10901 2>"$DIR/marsd.log" &
MARSD=$!
for _ in $(seq 600); do [ -S "$DIR/root/marsd.sock" ] && break; sleep 0.05; done
"$BIN/marsadm" --root "$DIR/root" create-cluster >/dev/null
"$BIN/marsadm" --root "$DIR/root" create-resource bench "$DIR/mars.img" >/dev/null
qemu-nbd -f raw -t -b 127.0.0.1 -p 10902 --cache=none --aio=native --fork --pid-file="$DIR/qnone.pid" "$DIR/qnone.raw"
qemu-nbd -f raw -t -b 127.0.0.1 -p 10903 --fork --pid-file="$DIR/qwb.pid" "$DIR/qwb.raw"
declare -A URI=([marsd]=nbd://127.0.0.1:10901/bench [qemu-nbd-cache=none]=nbd://127.0.0.1:10902 [qemu-nbd-writeback]=nbd://127.0.0.1:10903)
SERVERS=(marsd qemu-nbd-cache=none qemu-nbd-writeback)

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

fio_iops() {
  fio --name=bench --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=32 --size="$SIZE" \
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

declare -A IOPS COPY
for s in "${SERVERS[@]}"; do IOPS[$s]=""; COPY[$s]=""; done
for r in $(seq "$RUNS"); do
  for s in "${SERVERS[@]}"; do
    IOPS[$s]+="$(fio_iops "${URI[$s]}") "
    COPY[$s]+="$(copy_mibs "${URI[$s]}") "
  done
  echo "run $r/$RUNS done" >&2
done

printf '\n%-22s %14s %16s   (median of %s runs; all runs in brackets)\n' server "4k QD32 IOPS" "seq MiB/s" "$RUNS"
declare -A MI MC
for s in "${SERVERS[@]}"; do
  MI[$s]=$(echo "${IOPS[$s]}" | tr ' ' '\n' | grep . | median)
  MC[$s]=$(echo "${COPY[$s]}" | tr ' ' '\n' | grep . | median)
  printf '%-22s %14.0f %16.0f   [%s| %s]\n' "$s" "${MI[$s]}" "${MC[$s]}" \
    "$(for v in ${IOPS[$s]}; do printf '%.0f ' "$v"; done)" "$(for v in ${COPY[$s]}; do printf '%.0f ' "$v"; done)"
done
echo
for p in qemu-nbd-cache=none qemu-nbd-writeback; do
  printf 'marsd / %-20s random 4k write: %.2fx   sequential: %.2fx\n' "$p" \
    "$(echo "${MI[marsd]} / ${MI[$p]}" | bc -l)" "$(echo "${MC[marsd]} / ${MC[$p]}" | bc -l)"
done

bench_record nbd-rand4k "NBD random 4k write QD32 (fio nbd; no secondary)" IOPS higher 3 \
  "qemu-nbd --cache=none" "${IOPS[marsd]}" "${IOPS[qemu-nbd-cache=none]}"
bench_record nbd-rand4k-wb "NBD random 4k write QD32, vs page cache" IOPS higher null \
  "qemu-nbd writeback" "${IOPS[marsd]}" "${IOPS[qemu-nbd-writeback]}"
bench_record nbd-seq "NBD sequential $SIZE + flush (nbdcopy)" MiB/s higher 1 \
  "qemu-nbd --cache=none" "${COPY[marsd]}" "${COPY[qemu-nbd-cache=none]}"
