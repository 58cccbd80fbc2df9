#!/usr/bin/env bash
# Benchmark (not a test): fio on mars's local block device (/dev/mars/RES: FUSE file behind a
# direct-I/O loop device, writes through the transaction log) against fio on a loop device over
# a plain file on the same disk, measured in one run, printed as ratios. Needs root.
#
#   bench/device.sh [RUNS]           RUNS per measurement (default 3, median reported)
#
# Workloads (alternating between the two devices): random 4k writes at queue depth 32, and
# sequential 1M writes, each for 20 s with O_DIRECT (libaio).
# Env: BENCH_DIR (default /var/tmp/mars-bench-dev, must be on the disk under test), SIZE (2G).
set -euo pipefail
RUNS=${1:-${RUNS:-3}}
RUNTIME=${RUNTIME:-20}
DIR=${BENCH_DIR:-/var/tmp/mars-bench-dev}
SIZE=${SIZE:-2G}
HERE=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "bench: needs root (FUSE and loop devices)"; exit 1; }
for t in fio jq losetup; do
  command -v $t >/dev/null || { echo "bench: $t is not installed (apt-get install fio jq util-linux)"; exit 1; }
done
. "$HERE/bench/lib.sh"
if [ -z "${MARS_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$HERE/Cargo.toml" -p mars-daemon -p mars-cli
fi
BIN=${MARS_BIN:-${CARGO_TARGET_DIR:-$HERE/target}/release}
rm -rf "$DIR"; mkdir -p "$DIR"
cleanup() {
  [ -n "${LOOP:-}" ] && losetup -d "$LOOP" 2>/dev/null || true
  [ -n "${MARSD:-}" ] && kill "$MARSD" 2>/dev/null && wait "$MARSD" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

# Fully allocated backing files for both, so neither pays for block allocation.
fallocate -l "$SIZE" "$DIR/mars.img"; fallocate -l "$SIZE" "$DIR/plain.img"
LOOP=$(losetup --find --show --direct-io=on "$DIR/plain.img")
"$BIN/marsd" --root "$DIR/root" --host bench --listen 127.0.0.1:10910 --device fuse-loop --device-dir "$DIR/dev" \
  2>"$DIR/marsd.log" &
MARSD=$!
for _ in $(seq 600); do [ -S "$DIR/root/marsd.sock" ] && break; sleep 0.05; done
"$BIN/marsadm" --root "$DIR/root" create-cluster >/dev/null
"$BIN/marsadm" --root "$DIR/root" create-resource bench "$DIR/mars.img" >/dev/null
for _ in $(seq 100); do [ -b "$DIR/dev/bench" ] && break; sleep 0.05; done
MARSDEV=$(readlink -f "$DIR/dev/bench")
declare -A DEV=([mars]=$MARSDEV [loop]=$LOOP)

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
run_fio() { # DEV RW BS -> IOPS or MiB/s
  fio --name=bench --filename="$1" --direct=1 --ioengine=libaio --rw="$2" --bs="$3" \
      --iodepth=32 --size="$SIZE" --time_based --runtime="$RUNTIME" --output-format=json \
      --output="$DIR/fio.json" >/dev/null 2>&1
  if [ "$3" = 4k ]; then jq '.jobs[0].write.iops' "$DIR/fio.json"
  else jq '.jobs[0].write.bw_bytes / 1048576' "$DIR/fio.json"; fi
}

declare -A R4 S1
for d in mars loop; do R4[$d]=""; S1[$d]=""; done
for r in $(seq "$RUNS"); do
  for d in mars loop; do
    R4[$d]+="$(run_fio "${DEV[$d]}" randwrite 4k) "
    S1[$d]+="$(run_fio "${DEV[$d]}" write 1M) "
  done
  echo "run $r/$RUNS done"
done
m4=$(echo ${R4[mars]} | tr ' ' '\n' | median); l4=$(echo ${R4[loop]} | tr ' ' '\n' | median)
m1=$(echo ${S1[mars]} | tr ' ' '\n' | median); l1=$(echo ${S1[loop]} | tr ' ' '\n' | median)
printf '%-28s %12s %12s %8s\n' workload "/dev/mars" "loop(file)" ratio
printf '%-28s %12.0f %12.0f %8.2f\n' "random 4k QD32 (IOPS)" "$m4" "$l4" "$(echo "$m4/$l4" | bc -l)"
printf '%-28s %12.0f %12.0f %8.2f\n' "sequential 1M (MiB/s)" "$m1" "$l1" "$(echo "$m1/$l1" | bc -l)"

bench_record dev-rand4k "/dev/mars random 4k write QD32 (fio libaio direct)" IOPS higher 0.8 \
  "loop device on a plain file" "${R4[mars]}" "${R4[loop]}"
bench_record dev-seq1m "/dev/mars sequential 1M write QD32" MiB/s higher 0.8 \
  "loop device on a plain file" "${S1[mars]}" "${S1[loop]}"
