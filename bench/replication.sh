#!/usr/bin/env bash
# Benchmark (not a test): replication throughput, two marsd on 127.0.0.1 (a, primary) and
# 127.0.0.2 (b, secondary) sharing one disk, each figure printed next to a peer measured in the
# same run. Nothing here passes or fails on absolute numbers.
#
#   bench/replication.sh [DIR]      DIR: where the files go (default /var/tmp); it must be on the
#                                   disk under test. A fresh subdirectory is made and removed.
#
# 1. Catch-up: b is up to date, pauses fetching, a takes a burst of BURST random bytes through
#    NBD (nbdcopy from nbdkit's random plugin) and writes it back; then b resumes fetching and is
#    timed until `wait-resource r uptodate`. Peer: fio sequential 1 MiB O_DIRECT writes of a
#    BURST-sized file on the same filesystem with a final fsync, at queue depth 1 and 16.
#    (Catching up writes every byte twice on b: once into the fetched logfile, once on replay.)
# 2. Fast full sync: a's disk holds SYNC_SIZE random bytes; b's disk is a copy with CHANGED_PCT %
#    of its 1 MiB blocks (random ones) overwritten with other random data. Timed: join-resource
#    on b until `wait-resource r uptodate`; then the disks are compared. Peer: the same
#    1 %-different file brought up to date by rsync's delta algorithm over TCP on loopback
#    (rsync daemon on 127.0.0.2; --inplace --no-whole-file --ignore-times, and --fsync when this
#    rsync has it, as marsd syncs the disk at the end too).
#
# Every timed step runs ROUNDS times (each mars round on fresh data; fio and rsync alike) and
# the median is reported with the spread: single runs on a shared VM vary by half.
#
# Env: BURST (2G), SYNC_SIZE (4G), CHANGED_PCT (1), ROUNDS (3), PORT (17790; uses PORT..PORT+2),
#      PARTS ("1 2": which parts run; "1" for the catch-up alone),
#      MARS_BIN (directory holding marsd and marsadm; when unset the script runs
#      `cargo build --release -p mars-daemon -p mars-cli` and uses ${CARGO_TARGET_DIR:-target}/release),
#      KEEP=1 (keep the files and marsd logs for a look afterwards),
#      DROP_CACHES=1 (root only: drop the page cache before every timed step; default: warm cache,
#      the files were just written).
# Timing granularity: marsadm wait-resource polls every 0.05 s.
set -euo pipefail
PARENT=${1:-${BENCH_DIR:-/var/tmp}}
BURST=${BURST:-2G}
SYNC_SIZE=${SYNC_SIZE:-4G}
CHANGED_PCT=${CHANGED_PCT:-1}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-17790}
DROP_CACHES=${DROP_CACHES:-0}
PARTS=${PARTS:-1 2}
HERE=$(cd "$(dirname "$0")/.." && pwd)
MIB=1048576
. "$HERE/bench/lib.sh"
. "$HERE/bench/cluster.sh"

for t in fio rsync nbdcopy nbdkit jq cmp shuf bc numfmt; do
  command -v $t >/dev/null || { echo "bench: $t is not installed (apt-get install fio rsync libnbd-bin nbdkit jq bc)"; exit 1; }
done
mars_binaries
[ "$DROP_CACHES" != 1 ] || [ "$(id -u)" = 0 ] || { echo "bench: DROP_CACHES=1 needs root"; exit 1; }

BURST_B=$(numfmt --from=iec "$BURST")
SYNC_B=$(numfmt --from=iec "$SYNC_SIZE")
for v in "$BURST_B" "$SYNC_B"; do
  [ $((v % MIB)) -eq 0 ] && [ "$v" -gt 0 ] || { echo "bench: BURST and SYNC_SIZE must be multiples of 1M"; exit 1; }
done

mkdir -p "$PARENT"
DIR=$(mktemp -d "$PARENT/mars-bench-repl-XXXXXX")
RSYNCD=""
cleanup() {
  if [ -n "$CHILD" ]; then kill "$CHILD" 2>/dev/null || true; wait "$CHILD" 2>/dev/null || true; fi
  stop_hosts
  if [ -n "$RSYNCD" ]; then kill "$RSYNCD" 2>/dev/null || true; wait "$RSYNCD" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "bench: kept $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

drop_caches() {
  # Only the filesystem under test: a machine-wide sync can hang on other users' mounts.
  sync -f "$DIR"
  if [ "$DROP_CACHES" = 1 ]; then echo 3 >/proc/sys/vm/drop_caches; fi
}
# CPU seconds (user + system) used so far by process $1.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
# Bytes process $1 has read from / written to storage so far (/proc/PID/io; 0 where unreadable).
io_read() { awk '/^read_bytes/ {print $2}' "/proc/$1/io" 2>/dev/null || echo 0; }
io_written() { awk '/^write_bytes/ {print $2}' "/proc/$1/io" 2>/dev/null || echo 0; }
# Epoch seconds of the first line of marsd log $1 matching $2 (marsd logs RFC 3339 UTC times).
log_at() {
  local t
  t=$(grep -m1 -- "$2" "$1" | cut -d' ' -f1)
  [ -n "$t" ] && date -d "$t" +%s.%N || echo "$3"
}
# Bytes in host $1's logfiles of resource r.
logbytes() { find "$PART/$1/root/resource-r" -name 'log-*' -printf '%s\n' | awk '{n += $1} END {print n + 0}'; }
same() { cmp -s "$1" "$2" && echo yes || echo "NO (cmp: $(cmp "$1" "$2" 2>&1 | head -1))"; }

echo "bench: files under $DIR ($(df --output=fstype,source "$DIR" | tail -1 | tr -s " ")); page cache: $([ "$DROP_CACHES" = 1 ] && echo dropped before each timed step || echo warm)" >&2

# ---------------------------------------------------------------- 1. catch-up after a burst
PART=$DIR/p1
mkdir -p "$PART"
# Fully allocated disks, like fio's file below, so nobody pays for block allocation.
fallocate -l "$BURST_B" "$PART/a.img"
fallocate -l "$BURST_B" "$PART/b.img"
cluster_with_resource "$PORT" "$PART/a.img"
adm b join-resource r "$PART/b.img" >/dev/null
uptodate_or_die b 600
T_BURSTS=(); T_CATCHUPS=(); CPU_AS=(); CPU_BS=(); RD_AS=(); RD_BS=(); WR_BS=(); PRE=0
for round in $(seq "$ROUNDS"); do
  adm b pause-fetch r >/dev/null
  adm b --timeout 30 wait-resource r fetch-off
  B0=$(logbytes b)
  echo "bench: 1. round $round: writing the $BURST burst on a (b's fetch paused)" >&2
  s=$(now)
  bg nbdcopy --flush -- [ nbdkit random "$BURST_B" seed="$round" ] "nbd+unix:///r?socket=$PART/a/root/nbd.sock"
  e=$(now)
  T_BURSTS+=("$(calc "$e - $s")")
  # On real hosts a's writeback happens on another disk; here it would compete with b's catch-up.
  written_back
  drop_caches
  echo "bench: 1. round $round: b catching up" >&2
  # Did the pause hold? What b already has of the burst would flatter the rate.
  P=$(($(logbytes b) - B0))
  [ "$P" -le "$PRE" ] || PRE=$P
  CA=$(cpu "${PID[a]}"); CB=$(cpu "${PID[b]}")
  RA=$(io_read "${PID[a]}"); RB=$(io_read "${PID[b]}"); WB=$(io_written "${PID[b]}")
  s=$(now)
  adm b resume-fetch r >/dev/null
  uptodate_or_die b 3600
  e=$(now)
  T_CATCHUPS+=("$(calc "$e - $s")")
  CPU_AS+=("$(calc "$(cpu "${PID[a]}") - $CA")"); CPU_BS+=("$(calc "$(cpu "${PID[b]}") - $CB")")
  RD_AS+=($(($(io_read "${PID[a]}") - RA))); RD_BS+=($(($(io_read "${PID[b]}") - RB)))
  WR_BS+=($(($(io_written "${PID[b]}") - WB)))
  echo "bench: 1. round $round: $(calc "$e - $s") s; CPU a ${CPU_AS[-1]} s, b ${CPU_BS[-1]} s; storage read by a $(numfmt --to=iec "${RD_AS[-1]}"), by b $(numfmt --to=iec "${RD_BS[-1]}"), written by b $(numfmt --to=iec "${WR_BS[-1]}")" >&2
  # Rotate so that the replayed logfiles can go before the next burst.
  adm a cron >/dev/null
done
T_BURST=$(median "${T_BURSTS[@]}")
T_CATCHUP=$(median "${T_CATCHUPS[@]}")
CPU_A=$(median "${CPU_AS[@]}"); CPU_B=$(median "${CPU_BS[@]}")
RD_A=$(median "${RD_AS[@]}"); RD_B=$(median "${RD_BS[@]}"); WR_B=$(median "${WR_BS[@]}")
EQ1=$(same "$PART/a.img" "$PART/b.img")
stop_hosts
[ "${KEEP:-0}" = 1 ] || rm -rf "$PART"

echo "bench: 1. fio on the raw filesystem" >&2
fio_mibs() {
  fio --name=raw --filename="$DIR/fio.dat" --rw=write --bs=1M --direct=1 --size="$BURST_B" \
      --ioengine=libaio --iodepth="$1" --end_fsync=1 --output-format=json --output="$DIR/fio.json" >/dev/null
  rm -f "$DIR/fio.dat"
  calc "$(sed -n '/^{/,$p' "$DIR/fio.json" | jq '.jobs[0].write.bw_bytes') / $MIB"
}
FIO1S=(); FIO16S=()
for round in $(seq "$ROUNDS"); do
  drop_caches
  FIO1S+=("$(fio_mibs 1)")
  drop_caches
  FIO16S+=("$(fio_mibs 16)")
done
FIO1=$(median "${FIO1S[@]}"); FIO16=$(median "${FIO16S[@]}")

# ---------------------------------------------------------------- 2. fast full sync vs rsync
part2() { [[ " $PARTS " == *" 2 "* ]]; }
if part2; then
PART=$DIR/p2
mkdir -p "$PART"
echo "bench: 2. preparing $SYNC_SIZE disks" >&2
nbdcopy -- [ nbdkit random "$SYNC_B" seed=2 ] "$PART/a.img"
# The 1 %-different file: a copy of it goes to marsd, this one later to rsync.
cp "$PART/a.img" "$PART/b-rsync.img"
BLOCKS=$((SYNC_B / MIB))
NCHANGED=$(awk -v b="$BLOCKS" -v p="$CHANGED_PCT" 'BEGIN { n = int(b * p / 100); print (n < 1 ? 1 : n) }')
for i in $(shuf -i 0-$((BLOCKS - 1)) -n "$NCHANGED"); do
  dd if=/dev/urandom of="$PART/b-rsync.img" bs=1M count=1 seek="$i" conv=notrunc status=none
done
mv "$PART/b-rsync.img" "$PART/b-orig.img"
T_MARSS=(); CPU2_AS=(); CPU2_BS=(); EQ2=yes
for round in $(seq "$ROUNDS"); do
  rm -rf "$PART/a" "$PART/b"
  cp "$PART/b-orig.img" "$PART/b.img"
  cluster_with_resource $((PORT + 1)) "$PART/a.img"
  drop_caches
  echo "bench: 2. round $round: mars fast full sync" >&2
  CA=$(cpu "${PID[a]}"); CB=$(cpu "${PID[b]}")
  s=$(now)
  adm b join-resource r "$PART/b.img" >/dev/null
  uptodate_or_die b 3600
  e=$(now)
  T_MARSS+=("$(calc "$e - $s")")
  e2=$e; s2=$s
  CPU2_AS+=("$(calc "$(cpu "${PID[a]}") - $CA")"); CPU2_BS+=("$(calc "$(cpu "${PID[b]}") - $CB")")
  stop_hosts
  E=$(same "$PART/a.img" "$PART/b.img")
  [ "$E" = yes ] || EQ2="$E (round $round)"
done
T_MARS=$(median "${T_MARSS[@]}")
CPU2_A=$(median "${CPU2_AS[@]}"); CPU2_B=$(median "${CPU2_BS[@]}")
# The phases of the last round, from b's log.
L_START=$(log_at "$PART/b/marsd.log" "full sync from a starts" "$s2")
L_COPIED=$(log_at "$PART/b/marsd.log" "sync copy complete" "$L_START")
L_CONSISTENT=$(log_at "$PART/b/marsd.log" "the replica is consistent" "$L_COPIED")
MARS_XFER=$(sed -n 's/.*sync copy complete (\(.*\) transferred).*/\1/p' "$PART/b/marsd.log" | tail -1)
[ "${KEEP:-0}" = 1 ] || rm -f "$PART/b.img"

RPORT=$((PORT + 2))
cat >"$PART/rsyncd.conf" <<EOF
use chroot = no
uid = $(id -u)
gid = $(id -g)
[b]
  path = $PART
  read only = no
EOF
rsync --daemon --no-detach --address=127.0.0.2 --port="$RPORT" --config="$PART/rsyncd.conf" \
      --log-file="$PART/rsyncd.log" &
RSYNCD=$!
for _ in $(seq 100); do rsync "rsync://127.0.0.2:$RPORT/" >/dev/null 2>&1 && break; sleep 0.05; done
RSYNC_OPTS=(--inplace --no-whole-file --ignore-times --stats)
# (grep without -q: an early exit would SIGPIPE rsync and fail the pipeline under pipefail)
rsync --help 2>/dev/null | grep -- '--fsync' >/dev/null && RSYNC_OPTS+=(--fsync)
T_RSYNCS=(); EQ3=yes
for round in $(seq "$ROUNDS"); do
  cp "$PART/b-orig.img" "$PART/b-rsync.img"
  drop_caches
  echo "bench: 2. round $round: rsync" >&2
  s=$(now)
  bg rsync "${RSYNC_OPTS[@]}" "$PART/a.img" "rsync://127.0.0.2:$RPORT/b/b-rsync.img" >"$PART/rsync.stats"
  e=$(now)
  T_RSYNCS+=("$(calc "$e - $s")")
  E=$(same "$PART/a.img" "$PART/b-rsync.img")
  [ "$E" = yes ] || EQ3="$E (round $round)"
done
T_RSYNC=$(median "${T_RSYNCS[@]}")
RSYNC_LITERAL=$(sed -n 's/^Literal data: \(.*\)$/\1/p' "$PART/rsync.stats")
RSYNC_SENT=$(sed -n 's/^Total bytes sent: \(.*\)$/\1/p' "$PART/rsync.stats")
fi

# ---------------------------------------------------------------- report
CATCHUP=$(calc "$BURST_B / $MIB / $T_CATCHUP")
RATIO1=(); for t in "${T_CATCHUPS[@]}"; do RATIO1+=("$(calc "$BURST_B / $MIB / $t / $FIO1")"); done
RATIO2=(); if part2; then for i in "${!T_MARSS[@]}"; do RATIO2+=("$(calc "${T_RSYNCS[$i]} / ${T_MARSS[$i]}")"); done; fi
printf '\nmedians of %d rounds (spread min..max)\n' "$ROUNDS"
printf '\n1. catch-up after a %s burst (same disk for a, b and fio)\n' "$BURST"
printf '   burst written on a through NBD (nbdcopy --flush):   %7.2f s  %7.0f MiB/s\n' "$T_BURST" "$(calc "$BURST_B / $MIB / $T_BURST")"
printf '   b: resume-fetch until wait-resource uptodate:       %7.2f s  %7.0f MiB/s   (%s s)   replicas equal: %s\n' \
  "$T_CATCHUP" "$CATCHUP" "$(spread "${T_CATCHUPS[@]}")" "$EQ1"
printf '   logfile bytes b fetched while paused: %s%s\n' "$(numfmt --to=iec "$PRE")" \
  "$([ "$PRE" -gt $((BURST_B / 100)) ] && echo "  <- pause-fetch did not hold: the rate above is flattered")"
printf '   CPU used meanwhile: a %.2f s, b %.2f s (%d cores); b: %.2f CPU s per GiB\n' "$CPU_A" "$CPU_B" "$(nproc)" \
  "$(calc "$CPU_B * 1073741824 / $BURST_B")"
printf '   storage I/O meanwhile (/proc/PID/io): a read %s, b read %s, b wrote %s\n' \
  "$(numfmt --to=iec "$RD_A")" "$(numfmt --to=iec "$RD_B")" "$(numfmt --to=iec "$WR_B")"
printf '   raw disk, fio seq 1M writes O_DIRECT QD1 + fsync:             %7.0f MiB/s   (%s)\n' "$FIO1" "$(spread "${FIO1S[@]}")"
printf '   raw disk, fio seq 1M writes O_DIRECT QD16 + fsync:            %7.0f MiB/s   (%s)\n' "$FIO16" "$(spread "${FIO16S[@]}")"
printf '   catch-up / raw disk:  %.2fx of QD1, %.2fx of QD16   (per round vs median QD1: %s; aim: >= 0.5x)\n' \
  "$(calc "$CATCHUP / $FIO1")" "$(calc "$CATCHUP / $FIO16")" "$(spread "${RATIO1[@]}")"
printf '   (b writes every byte twice, into its log copy and on replay, on the disk a reads from:\n'
printf '    0.5x of one writer is the ceiling on one disk)\n'
if part2; then
printf '\n2. fast full sync of %s, %d of %d 1 MiB blocks differ (%s %%)\n' "$SYNC_SIZE" "$NCHANGED" "$BLOCKS" "$CHANGED_PCT"
printf '   mars join-resource until wait-resource uptodate:    %7.2f s   (%s s)   transferred %s (b'"'"'s log)   disks equal: %s\n' \
  "$T_MARS" "$(spread "${T_MARSS[@]}")" "${MARS_XFER:-?}" "$EQ2"
printf '     last round: join -> sync starts %.2f s, copy %.2f s, -> consistent %.2f s, -> uptodate seen %.2f s (times from b'"'"'s log)\n' \
  "$(calc "$L_START - $s2")" "$(calc "$L_COPIED - $L_START")" "$(calc "$L_CONSISTENT - $L_COPIED")" "$(calc "$e2 - $L_CONSISTENT")"
printf '     CPU used: a %.2f s, b %.2f s\n' "$CPU2_A" "$CPU2_B"
printf '   rsync daemon on 127.0.0.2, push, %s:\n' "${RSYNC_OPTS[*]}"
printf '                                                       %7.2f s   (%s s)   literal data %s, %s bytes sent   files equal: %s\n' \
  "$T_RSYNC" "$(spread "${T_RSYNCS[@]}")" "${RSYNC_LITERAL:-?}" "${RSYNC_SENT:-?}" "$EQ3"
printf '   mars faster than rsync: %.2fx   (round by round: %s; aim: >= 3x)\n' "$(calc "$T_RSYNC / $T_MARS")" "$(spread "${RATIO2[@]}")"
fi

# For bench/run (bench/lib.sh): per-round figures of both sides.
RATES=(); for t in "${T_CATCHUPS[@]}"; do RATES+=("$(calc "$BURST_B / $MIB / $t")"); done
CACHE=$([ "$DROP_CACHES" = 1 ] && echo cold || echo warm)
# (the warm run keeps the plain id of earlier results; the cold one gets its own)
bench_record "catchup$([ "$CACHE" = warm ] || echo "-$CACHE")" "catch-up after a $BURST burst, one disk, $CACHE cache" MiB/s higher 0.45 \
  "fio seq 1M O_DIRECT QD1" "${RATES[*]}" "${FIO1S[*]}"
part2 || exit 0
bench_record "fullsync-$CACHE" "fast full sync $SYNC_SIZE, $CHANGED_PCT % differ, $CACHE cache" s lower 4 \
  "rsync --inplace --no-whole-file" "${T_MARSS[*]}" "${T_RSYNCS[*]}"
