#!/usr/bin/env bash
# Benchmark (not a test): many resources on one cluster. Three marsd (a, b, c on 127.0.0.1/2/3,
# `--device none`, each its own root in a temp dir) form one cluster; a creates N small
# resources (plain sparse files as disks), b and c join every one of them (full sync). Then:
#
#   create            time for `create-resource` of all N on a, one after the other
#   join+uptodate     from the first `join-resource` until every resource is UpToDate on b and
#                     on c (b and c join in parallel, each one resource at a time; polled with
#                     `marsadm --json view` every POLL s, so this figure is rounded up to that;
#                     where `view all` fails, one call per resource not yet up to date makes a
#                     poll itself take seconds: the table gives the average poll period)
#   idle, per daemon  after everything settled (SETTLE s): CPU over IDLE s in % of ONE core
#                     (utime+stime from /proc/PID/stat), then RSS (VmRSS), threads
#                     (/proc/PID/status) and open files (/proc/PID/fd). An idle cluster should
#                     cost close to nothing; these figures growing with N is the scaling problem.
#   propagation       `pause-fetch` / `resume-fetch` of one resource on c, timed from the start of
#                     the command until a and b both read the new switch value with `get-link`
#                     (median and worst of ROUNDS; each poll is one marsadm call, a few ms).
#   handover          `marsadm primary all` on b, moving every resource from a to b. Where this
#                     marsadm has no `primary all` (it refuses "all" as a resource name), the
#                     script falls back to `marsadm primary RES` for one resource after the
#                     other and says "sequential fallback"; the per-resource average is shown
#                     either way. Afterwards b must be the designated and acting primary of all.
#   wall              the whole run after the build.
#
# How to read it: compare the idle rows across N. CPU, threads and open files that grow
# linearly with N mean per-resource threads and per-resource polling; a propagation time near
# a multiple of 0.25 or 0.3 s is the reconcile / metadata pull interval showing through.
# Targets of the scaling rework (N=1000): idle CPU < 2 % of a core per daemon, RSS < 512 MiB,
# threads not proportional to N, `primary all` < 60 s, a setting on every host within 1 s.
#
#   bench/scale.sh [--json FILE] [N]      N resources (default 100); the figures as JSON go to
#                                         FILE, or to stdout after the table
#
# Env: SIZE (2M; must be above 64 KiB), PORT (17810), IDLE (20), SETTLE (10), ROUNDS (9),
#      LOGROTATE (4M: marsd --logrotate-size; a primary reserves that much disk space for each
#      resource's current logfile, so the default of 1G would need N GiB on the primary's root,
#      twice over here where a and b share one filesystem),
#      POLL (1), SETUP_LIMIT (1800: seconds that creating + joining may take; beyond that the
#      run stops, reports how far it got and the rates, and exits 3),
#      PARALLEL (8: K of `primary --parallel K all` where marsadm has it),
#      HANDOVER_LIMIT (1200: seconds the handover may take; the sequential fallback stops there
#      and reports how many resources moved and the time per resource),
#      MARS_BIN (directory holding marsd and marsadm; default: cargo build --release),
#      KEEP=1 (keep the directory with the marsd logs), TMPDIR (where the directory goes),
#      HOLD (0: seconds to keep the idle cluster as it is after the idle measurement, with the
#      daemons' PIDs printed, for `perf top -p PID` or `top -H -p PID` by hand; not in the wall
#      time).
# Progress lines go to stderr, the table to stdout.
set -euo pipefail
T_START=$(date +%s.%N)
JSON_OUT=""
N=""
while [ $# -gt 0 ]; do
  case $1 in
    --json) [ $# -ge 2 ] || { echo "bench: --json needs a FILE" >&2; exit 2; }; JSON_OUT=$2; shift 2 ;;
    --json=*) JSON_OUT=${1#--json=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "bench: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -z "$N" ] || { echo "bench: one N only" >&2; exit 2; }; N=$1; shift ;;
  esac
done
N=${N:-100}
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "bench: N must be a positive number, not '$N'" >&2; exit 2; }
SIZE=${SIZE:-2M}
PORT=${PORT:-17810}
IDLE=${IDLE:-20}
SETTLE=${SETTLE:-10}
ROUNDS=${ROUNDS:-9}
POLL=${POLL:-1}
SETUP_LIMIT=${SETUP_LIMIT:-1800}
PARALLEL=${PARALLEL:-8}
LOGROTATE=${LOGROTATE:-4M}
HOLD=${HOLD:-0}
HANDOVER_LIMIT=${HANDOVER_LIMIT:-1200}
HERE=$(cd "$(dirname "$0")/.." && pwd)

for t in jq bc awk truncate getconf numfmt df du; do
  command -v "$t" >/dev/null || { echo "bench: $t is not installed (apt-get install jq bc)" >&2; exit 1; }
done
if [ -n "${MARS_BIN:-}" ]; then
  BIN=$MARS_BIN
else
  echo "bench: cargo build --release -p mars-daemon -p mars-cli" >&2
  cargo build --release --quiet --manifest-path "$HERE/Cargo.toml" -p mars-daemon -p mars-cli
  BIN=${CARGO_TARGET_DIR:-$HERE/target}/release
fi
for b in marsd marsadm; do [ -x "$BIN/$b" ] || { echo "bench: $BIN/$b missing" >&2; exit 1; }; done
if [ -n "$JSON_OUT" ]; then
  JSON_OUT=$(realpath -m "$JSON_OUT")
  : >"$JSON_OUT" || { echo "bench: cannot write $JSON_OUT" >&2; exit 1; }
fi

# Every resource holds a few descriptors open in each daemon (disk, logfile, sockets of its
# fetch and sync streams, ...): the issue saw 2,120 open files at 300 resources, so 1,000 need
# several thousand, beyond the usual soft limit of 1,024. Raise the soft limit to the hard one
# for the daemons (they inherit it); the table shows what they actually use.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if [ "$NOFILE" != unlimited ] && [ "$NOFILE" -lt $((N * 10 + 256)) ]; then
  echo "bench: warning: open-file limit $NOFILE may be too low for $N resources" >&2
fi

DIR=$(mktemp -d "${TMPDIR:-/tmp}/mars-scale-XXXXXX")
# Space: each primary logfile reserves LOGROTATE (a for all N, then b after the handover), the
# disks are sparse, and below 1 GiB free (marsd's --min-free-space) secondaries drop their logs.
NEED_KB=$(( ( 2 * N * $(numfmt --from=iec "$LOGROTATE") + 3 * 1024 * 1024 * 1024 ) / 1024 ))
AVAIL_KB=$(df -Pk "$DIR" | awk 'NR == 2 {print $4}')
if [ "$AVAIL_KB" -lt "$NEED_KB" ]; then
  rmdir "$DIR"
  echo "bench: $((AVAIL_KB / 1024)) MiB free under ${TMPDIR:-/tmp}, this run needs about $((NEED_KB / 1024)) MiB (LOGROTATE=$LOGROTATE per resource and host, plus 3 GiB); set TMPDIR or LOGROTATE" >&2
  exit 1
fi
HOSTS=(a b c)
declare -A PID IP
IP[a]=127.0.0.1; IP[b]=127.0.0.2; IP[c]=127.0.0.3
JOBS=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for j in "${JOBS[@]}"; do kill "$j" 2>/dev/null || true; done
  for h in "${!PID[@]}"; do kill "${PID[$h]}" 2>/dev/null || true; done
  for j in "${JOBS[@]}"; do wait "$j" 2>/dev/null || true; done
  # SIGTERM makes marsd write everything back and exit; do not leave one behind.
  for h in "${!PID[@]}"; do
    for _ in $(seq 300); do kill -0 "${PID[$h]}" 2>/dev/null || break; sleep 0.1; done
    kill -9 "${PID[$h]}" 2>/dev/null || true
    wait "${PID[$h]}" 2>/dev/null || true
  done
  if [ "${KEEP:-0}" = 1 ]; then echo "bench: kept $DIR" >&2; else rm -rf "$DIR"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
calc() { echo "$*" | bc -l | sed 's/^\./0./; s/^-\./-0./'; }
say() { printf 'bench: [%6.1f s] %s\n' "$(calc "$(now) - $T0")" "$*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }
adm() { local h=$1; shift; "$BIN/marsadm" --root "$DIR/$h/root" "$@"; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }
W=${#N}; [ "$W" -ge 3 ] || W=3
res() { printf "r%0${W}d\n" "$1"; }
# states HOST [RES...] >FILE: one line per resource, "NAME DISKSTATE ROLE PRIMARY STUCK" (STUCK
# 1 or 0); without RES every resource. One `view all` call while its answer fits marsadm's
# message limit (64 KiB: about 50 resources), otherwise one `view RES` call per resource.
# Not to be called in $(...): it remembers in VIEW_ALL that `view all` failed.
VIEW_ALL=1
VIEW_ALL_ERR=""
JQ_STATE='select(.resources) | .resources[] | "\(.name) \(.disk_state) \(.role) \(.primary) \(if .stuck then 1 else 0 end)"'
states() {
  local h=$1 out r k
  shift
  if [ "$VIEW_ALL" = 1 ]; then
    if out=$(adm "$h" --json --timeout 60 view all 2>"$DIR/view-all.err"); then
      jq -r "$JQ_STATE" <<<"$out"
      return 0
    fi
    VIEW_ALL=0
    VIEW_ALL_ERR=$(head -1 "$DIR/view-all.err")
    say "\`marsadm view all\` on $h failed ($VIEW_ALL_ERR); asking for each resource from now on"
  fi
  if [ $# = 0 ]; then set -- $(for k in $(seq "$N"); do res "$k"; done); fi
  for r in "$@"; do adm "$h" --json --timeout 60 view "$r" 2>/dev/null || true; done | jq -r "$JQ_STATE"
}
# ticks HOST: CPU ticks (utime + stime) of that marsd so far.
ticks() { awk '{print $14 + $15}' "/proc/${PID[$1]}/stat"; }
status_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/${PID[$1]}/status"; }
fds() { find "/proc/${PID[$1]}/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
HZ=$(getconf CLK_TCK)
alive() {
  for h in "${HOSTS[@]}"; do
    kill -0 "${PID[$h]}" 2>/dev/null || { echo "bench: marsd $h died; its log:" >&2; tail -30 "$DIR/$h/marsd.log" >&2; exit 1; }
  done
}

T0=$(now)
# The machine may be shared: its load average goes into the report, timings depend on it.
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
say "N=$N resources of $SIZE, directory $DIR ($((AVAIL_KB / 1024)) MiB free), open-file limit $NOFILE, $(nproc) cores, logrotate $LOGROTATE"
i=0
for h in "${HOSTS[@]}"; do
  mkdir -p "$DIR/$h/disks"
  "$BIN/marsd" --root "$DIR/$h/root" --host "$h" --listen "${IP[$h]}:$PORT" --device none \
    --logrotate-size "$LOGROTATE" 2>"$DIR/$h/marsd.log" &
  PID[$h]=$!
  i=$((i + 1))
done
for h in "${HOSTS[@]}"; do
  for _ in $(seq 200); do
    [ -S "$DIR/$h/root/marsd.sock" ] && adm "$h" view >/dev/null 2>&1 && continue 2
    kill -0 "${PID[$h]}" 2>/dev/null || break
    sleep 0.05
  done
  echo "bench: marsd $h did not come up:" >&2; cat "$DIR/$h/marsd.log" >&2; exit 1
done
adm a create-cluster >/dev/null
adm b join-cluster "${IP[a]}:$PORT" --token "$(adm a join-token)" >/dev/null
adm c join-cluster "${IP[a]}:$PORT" --token "$(adm a join-token)" >/dev/null
for h in "${HOSTS[@]}"; do adm "$h" --timeout 60 wait-cluster >/dev/null || die "wait-cluster failed on $h"; done
say "cluster of a, b, c formed"

# One background loop per host; each writes the number of resources joined so far and the
# names whose join was refused.
join_all() {
  local h=$1 k r out
  for k in $(seq "$N"); do
    r=$(res "$k")
    if ! out=$(adm "$h" --timeout 120 join-resource "$r" "$DIR/$h/disks/$r" 2>&1); then
      echo "$r: $out" >>"$DIR/$h/join-failed"
    fi
    echo "$k" >"$DIR/$h/joined.tmp" && mv "$DIR/$h/joined.tmp" "$DIR/$h/joined"
  done
  now >"$DIR/$h/joined-at"
}
joined() { cat "$DIR/$1/joined" 2>/dev/null || echo 0; }
declare -A UPTODATE=([b]=0 [c]=0) STUCK=([b]=0 [c]=0)

rootmib() { du -sk "$DIR/$1/root" 2>/dev/null | awk '{printf "%d", $1 / 1024}'; }
# Snapshot of the daemons' threads, RSS and open files (for the report of an aborted setup).
snapshot() {
  local h out=""
  for h in "${HOSTS[@]}"; do
    out+="$h: $(status_kb "$h" Threads) threads, $(( $(status_kb "$h" VmRSS) / 1024 )) MiB, $(fds "$h") fds, root $(rootmib "$h") MiB on disk; "
  done
  echo "${out%; }"
}
# Called when creating + joining took longer than SETUP_LIMIT: how far it got, then exit 3.
setup_abort() {
  local phase=$1 el
  el=$(calc "$(now) - $T_CREATE0")
  say "SETUP_LIMIT of $SETUP_LIMIT s reached during $phase; stopping this run"
  {
    printf '\nN=%d: ABORTED after %.0f s of creating + joining (SETUP_LIMIT=%s s), during %s\n' "$N" "$el" "$SETUP_LIMIT" "$phase"
    printf '  created on a:             %d of %d' "$CREATED" "$N"
    [ -n "${T_CREATE:-}" ] && printf ' in %.1f s' "$T_CREATE"
    printf ' (%.2f resources/s)\n' "$(calc "$CREATED / ${T_CREATE:-$el}")"
    if [ "$phase" = joining ]; then
      local je; je=$(calc "$(now) - $T_JOIN0")
      for h in b c; do
        printf '  %s: joined %d, UpToDate %d of %d after %.0f s of joining (%.2f up-to-date/s)\n' "$h" \
          "$(joined "$h")" "${UPTODATE[$h]:-0}" "$N" "$je" "$(calc "${UPTODATE[$h]:-0} / $je")"
      done
    fi
    printf '  daemons now (busy, not idle): %s\n' "$(snapshot)"
  } | tee "$DIR/abort.txt"
  local j
  j=$(jq -n --argjson n "$N" --arg phase "$phase" --argjson elapsed "$el" --argjson created "$CREATED" \
        --arg snapshot "$(snapshot)" --argjson jb "$(joined b)" --argjson jc "$(joined c)" \
        --argjson ub "${UPTODATE[b]:-0}" --argjson uc "${UPTODATE[c]:-0}" \
        '{n: $n, aborted: true, phase: $phase, setup_secs: $elapsed, created: $created,
          joined: {b: $jb, c: $jc}, uptodate: {b: $ub, c: $uc}, daemons_busy: $snapshot}')
  if [ -n "$JSON_OUT" ]; then echo "$j" >"$JSON_OUT"; else echo "$j"; fi
  exit 3
}

# ---------------------------------------------------------------- create on a
CREATED=0
T_CREATE0=$(now)
STEP=$(( N >= 200 ? N / 10 : (N >= 20 ? N / 5 : N) ))
for k in $(seq "$N"); do
  r=$(res "$k")
  for h in "${HOSTS[@]}"; do truncate -s "$SIZE" "$DIR/$h/disks/$r"; done
  out=$(adm a --timeout 120 create-resource "$r" "$DIR/a/disks/$r" 2>&1) || { alive; die "create-resource $r on a failed: $out"; }
  CREATED=$k
  if [ $((k % STEP)) = 0 ]; then
    el=$(calc "$(now) - $T_CREATE0")
    say "created $k/$N on a ($(printf '%.1f' "$(calc "$k / $el")")/s)"
    [ "$(calc "$el > $SETUP_LIMIT")" = 0 ] || { T_CREATE=$el; setup_abort creating; }
  fi
done
T_CREATE=$(calc "$(now) - $T_CREATE0")
say "all $N created in $(printf '%.1f' "$T_CREATE") s"

# b and c must know every resource before join-resource accepts it.
last=$(res "$N")
for h in b c; do
  for _ in $(seq 1200); do
    [ "$(adm "$h" get-link "resource-$last/primary" 2>/dev/null)" = a ] && continue 2
    sleep 0.05
  done
  die "resource $last never reached $h"
done
T_KNOWN=$(calc "$(now) - $T_CREATE0 - $T_CREATE")
say "b and c know all $N resources ($(printf '%.1f' "$T_KNOWN") s after the last create)"

# ---------------------------------------------------------------- join on b and c
# Each host's resources not seen UpToDate yet; a resource seen UpToDate once counts as done.
for h in b c; do for k in $(seq "$N"); do res "$k"; done >"$DIR/$h/pending"; done
T_JOIN0=$(now)
for h in b c; do join_all "$h" & JOBS+=($!); done
POLLS=0
while :; do
  POLLS=$((POLLS + 1))
  alive
  done_all=1
  line=""
  for h in b c; do
    # Only the resources whose join-resource was issued (names sort in creation order).
    j=$(joined "$h")
    # shellcheck disable=SC2046 # one name per word
    states "$h" $(awk -v last="$(res "$j")" '$1 <= last' "$DIR/$h/pending") >"$DIR/$h/states"
    awk '$2 == "UpToDate" {print $1}' "$DIR/$h/states" >"$DIR/$h/uptodate-now"
    grep -vxFf "$DIR/$h/uptodate-now" "$DIR/$h/pending" >"$DIR/$h/pending.new" || true
    mv "$DIR/$h/pending.new" "$DIR/$h/pending"
    UPTODATE[$h]=$(( N - $(wc -l <"$DIR/$h/pending") ))
    STUCK[$h]=$(awk '$5 == 1' "$DIR/$h/states" | wc -l)
    line+="$h: joined $(joined "$h")/$N, UpToDate ${UPTODATE[$h]}, stuck ${STUCK[$h]}; "
    [ "${UPTODATE[$h]}" -ge "$N" ] || done_all=0
  done
  el=$(calc "$(now) - $T_JOIN0")
  [ "$done_all" = 1 ] && break
  say "${line%; }"
  [ "$(calc "$T_CREATE + $el > $SETUP_LIMIT")" = 0 ] || setup_abort joining
  sleep "$POLL"
done
T_UPTODATE=$(calc "$(now) - $T_JOIN0")
for j in "${JOBS[@]}"; do wait "$j" || true; done
JOBS=()
# When the last join-resource returned, on the slower of b and c.
T_JOINED=$(calc "$(sort -g "$DIR/b/joined-at" "$DIR/c/joined-at" | tail -1) - $T_JOIN0")
JOIN_FAILED=0
for h in b c; do
  if [ -s "$DIR/$h/join-failed" ]; then
    JOIN_FAILED=$((JOIN_FAILED + $(wc -l <"$DIR/$h/join-failed")))
    say "join-resource refused on $h: $(head -3 "$DIR/$h/join-failed" | tr '\n' ' ')"
  fi
done
say "all $N UpToDate on b and c after $(printf '%.1f' "$T_UPTODATE") s (joins issued in $(printf '%.1f' "$T_JOINED") s)"

# ---------------------------------------------------------------- idle
say "settling $SETTLE s, then measuring idle daemons for $IDLE s"
sleep "$SETTLE"
alive
declare -A TK0 CPU RSS THR FDS
for h in "${HOSTS[@]}"; do TK0[$h]=$(ticks "$h"); done
ti0=$(now)
sleep "$IDLE"
ti1=$(now)
for h in "${HOSTS[@]}"; do
  CPU[$h]=$(calc "($(ticks "$h") - ${TK0[$h]}) * 100 / $HZ / ($ti1 - $ti0)")
  RSS[$h]=$(status_kb "$h" VmRSS)
  THR[$h]=$(status_kb "$h" Threads)
  FDS[$h]=$(fds "$h")
done
alive
if [ "$HOLD" != 0 ]; then
  say "HOLD: idle cluster kept for $HOLD s; marsd PIDs a ${PID[a]}, b ${PID[b]}, c ${PID[c]}"
  sleep "$HOLD"
fi
say "idle CPU: a $(printf '%.1f' "${CPU[a]}") %, b $(printf '%.1f' "${CPU[b]}") %, c $(printf '%.1f' "${CPU[c]}") % of one core; threads ${THR[a]}/${THR[b]}/${THR[c]}; RSS $((RSS[a] / 1024))/$((RSS[b] / 1024))/$((RSS[c] / 1024)) MiB; open files ${FDS[a]}/${FDS[b]}/${FDS[c]}"

# ---------------------------------------------------------------- metadata propagation
PROBE=$(res 1)
KEY="resource-$PROBE/todo-c/fetch"
LAT=(); CMDT=()
for j in $(seq "$ROUNDS"); do
  if [ $((j % 2)) = 1 ]; then cmd=pause-fetch; want=0; else cmd=resume-fetch; want=1; fi
  s=$(now)
  adm c "$cmd" "$PROBE" >/dev/null || die "$cmd $PROBE on c failed"
  m=$(now)
  seen_a=""; seen_b=""
  for _ in $(seq 6000); do
    [ -n "$seen_a" ] || { [ "$(adm a get-link "$KEY" 2>/dev/null)" = "$want" ] && seen_a=1; }
    [ -n "$seen_b" ] || { [ "$(adm b get-link "$KEY" 2>/dev/null)" = "$want" ] && seen_b=1; }
    [ -n "$seen_a" ] && [ -n "$seen_b" ] && break
  done
  e=$(now)
  [ -n "$seen_a" ] && [ -n "$seen_b" ] || die "$cmd on c never became visible on a and b ($KEY)"
  LAT+=("$(calc "($e - $s) * 1000")")
  CMDT+=("$(calc "($m - $s) * 1000")")
  sleep 0.5
done
# An odd number of rounds ends paused: switch fetch back on.
[ "$(adm c get-link "$KEY")" = 1 ] || adm c resume-fetch "$PROBE" >/dev/null
PROP_MED=$(median "${LAT[@]}")
PROP_MAX=$(printf '%s\n' "${LAT[@]}" | sort -g | tail -1)
PROP_CMD=$(median "${CMDT[@]}")
say "propagation: median $(printf '%.0f' "$PROP_MED") ms, worst $(printf '%.0f' "$PROP_MAX") ms"

# ---------------------------------------------------------------- handover to b
# marsd's warnings and errors so far (the handover adds expected ones: fetch connections to
# the old primary close).
logcount() { grep -c " $2 " "$DIR/$1/marsd.log" || true; }
declare -A WARN0 ERR0
for h in "${HOSTS[@]}"; do WARN0[$h]=$(logcount "$h" WARN); ERR0[$h]=$(logcount "$h" ERROR); done
# Does this marsadm have `primary all`? With --parallel in its help, use it; otherwise try the
# plain form and look at the refusal: today's marsadm refuses "all" as a reserved resource
# name before it asks the daemon, so nothing changed and the one-at-a-time loop follows.
if adm b primary --help 2>&1 | grep -q -- '--parallel'; then
  HO_CMD=(primary --parallel "$PARALLEL" all); HO_MODE="primary --parallel $PARALLEL all"
else
  HO_CMD=(primary all); HO_MODE="primary all"
fi
say "handover of $N resources a -> b: trying \`marsadm ${HO_CMD[*]}\` on b"
HO_FAILED=0
HO_DONE=$N
HO_STOPPED=0
s=$(now)
rc=0
adm b --timeout "$HANDOVER_LIMIT" "${HO_CMD[@]}" >"$DIR/primary-all.out" 2>&1 || rc=$?
if [ "$rc" != 0 ]; then
  if grep -qiE 'reserved word|unexpected argument|invalid value|unrecognized' "$DIR/primary-all.out"; then
    say "not supported ($(head -1 "$DIR/primary-all.out")): sequential fallback, \`marsadm primary RES\` one at a time"
    HO_MODE="sequential fallback (marsadm primary RES, one at a time)"
    s=$(now)
    last_say=$s
    for k in $(seq "$N"); do
      r=$(res "$k")
      if ! out=$(adm b --timeout 120 primary "$r" 2>&1); then
        HO_FAILED=$((HO_FAILED + 1))
        echo "$r: $out" >>"$DIR/primary-failed"
      fi
      t=$(now)
      el=$(calc "$t - $s")
      if [ $((k % STEP)) = 0 ] || [ "$(calc "$t - $last_say > 30")" = 1 ]; then
        say "primary on b: $k/$N ($(printf '%.2f' "$(calc "$el / $k")") s each)"
        last_say=$t
      fi
      if [ "$k" -lt "$N" ] && [ "$(calc "$el > $HANDOVER_LIMIT")" = 1 ]; then
        HO_DONE=$k
        HO_STOPPED=1
        say "HANDOVER_LIMIT of $HANDOVER_LIMIT s reached: stopping the handover after $k of $N"
        break
      fi
    done
  else
    HO_FAILED=-1
    say "\`marsadm ${HO_CMD[*]}\` failed (exit $rc): $(head -3 "$DIR/primary-all.out" | tr '\n' ' ')"
  fi
fi
T_HANDOVER=$(calc "$(now) - $s")
[ -s "$DIR/primary-failed" ] && say "primary refused for $HO_FAILED: $(head -3 "$DIR/primary-failed" | tr '\n' ' ')"
# Verify: b designated and acting primary of every resource handed over (a may take a moment
# to step down; the handover time above does not include this check).
say "checking the roles on a and b"
for _ in $(seq 10); do
  states b >"$DIR/b/states"
  B_PRIMARY=$(awk '$3 == "Primary" && $4 == "b"' "$DIR/b/states" | wc -l)
  [ "$B_PRIMARY" -ge "$HO_DONE" ] && break
  sleep 2
done
states a >"$DIR/a/states"
A_PRIMARY=$(awk '$3 == "Primary"' "$DIR/a/states" | wc -l)
say "b is designated and acting primary of $B_PRIMARY/$N (a still acting primary of $A_PRIMARY)"

# ---------------------------------------------------------------- report
WALL=$(calc "$(now) - $T0 - $HOLD")
declare -A DU
for h in "${HOSTS[@]}"; do DU[$h]=$(rootmib "$h"); done
declare -A WARN ERR
for h in "${HOSTS[@]}"; do WARN[$h]=$(logcount "$h" WARN); ERR[$h]=$(logcount "$h" ERROR); done
HO_EACH=$(calc "$T_HANDOVER / $HO_DONE")
{
  printf '\nmars scale: N=%d resources of %s on 3 hosts (loopback, %d cores, --device none)\n' "$N" "$SIZE" "$(nproc)"
  printf '  create all on a (one at a time):          %8.1f s   %6.3f s each\n' "$T_CREATE" "$(calc "$T_CREATE / $N")"
  printf '  join on b and c until all UpToDate:       %8.1f s   (joins issued in %.1f s; polled about every %.1f s; refused joins: %d)\n' \
    "$T_UPTODATE" "$T_JOINED" "$(calc "$T_UPTODATE / $POLLS")" "$JOIN_FAILED"
  printf '  idle, after %s s settling, over %s s:\n' "$SETTLE" "$IDLE"
  printf '    host   CPU %% of one core      RSS MiB   threads   open files\n'
  for h in "${HOSTS[@]}"; do
    printf '    %-4s   %17.1f   %10.1f   %7d   %10d\n' "$h" "${CPU[$h]}" "$(calc "${RSS[$h]} / 1024")" "${THR[$h]}" "${FDS[$h]}"
  done
  printf '  setting on c visible on a and b:          %8.0f ms median, %.0f ms worst of %d (%s on %s; the command itself %.0f ms)\n' \
    "$PROP_MED" "$PROP_MAX" "$ROUNDS" "pause-fetch/resume-fetch" "$PROBE" "$PROP_CMD"
  printf '  handover a -> b, %s:%s\n' "$HO_MODE" \
    "$([ "$HO_STOPPED" = 0 ] || echo " STOPPED at HANDOVER_LIMIT=$HANDOVER_LIMIT s after $HO_DONE of $N")"
  printf '                                            %8.1f s   %6.3f s per resource; b primary of %d/%d, a still primary of %d; refused %d\n' \
    "$T_HANDOVER" "$HO_EACH" "$B_PRIMARY" "$N" "$A_PRIMARY" "$HO_FAILED"
  printf '  disk space of each root at the end:      a %d MiB, b %d MiB, c %d MiB (logfiles reserve up to LOGROTATE=%s each)\n' \
    "${DU[a]}" "${DU[b]}" "${DU[c]}" "$LOGROTATE"
  printf '  marsadm view all:                          %s\n' "$([ "$VIEW_ALL" = 1 ] && echo ok || echo "FAILS: $VIEW_ALL_ERR")"
  printf '  marsd WARN/ERROR lines before the handover: a %d/%d, b %d/%d, c %d/%d; during it: a %d/%d, b %d/%d, c %d/%d\n' \
    "${WARN0[a]}" "${ERR0[a]}" "${WARN0[b]}" "${ERR0[b]}" "${WARN0[c]}" "${ERR0[c]}" \
    $((WARN[a] - WARN0[a])) $((ERR[a] - ERR0[a])) $((WARN[b] - WARN0[b])) $((ERR[b] - ERR0[b])) \
    $((WARN[c] - WARN0[c])) $((ERR[c] - ERR0[c]))
  printf '  wall time (after the build):              %8.1f s   (load average at the start %s, at the end %s)\n' \
    "$WALL" "$LOAD0" "$(cut -d' ' -f1-3 /proc/loadavg)"
}
JSON=$(jq -n \
  --argjson n "$N" --arg size "$SIZE" --argjson cores "$(nproc)" \
  --argjson create "$T_CREATE" --argjson uptodate "$T_UPTODATE" --argjson joined "$T_JOINED" \
  --argjson join_failed "$JOIN_FAILED" --argjson idle "$IDLE" --argjson settle "$SETTLE" \
  --argjson cpu_a "${CPU[a]}" --argjson cpu_b "${CPU[b]}" --argjson cpu_c "${CPU[c]}" \
  --argjson rss_a "${RSS[a]}" --argjson rss_b "${RSS[b]}" --argjson rss_c "${RSS[c]}" \
  --argjson thr_a "${THR[a]}" --argjson thr_b "${THR[b]}" --argjson thr_c "${THR[c]}" \
  --argjson fds_a "${FDS[a]}" --argjson fds_b "${FDS[b]}" --argjson fds_c "${FDS[c]}" \
  --argjson prop_med "$PROP_MED" --argjson prop_max "$PROP_MAX" --argjson prop_cmd "$PROP_CMD" --argjson rounds "$ROUNDS" \
  --arg ho_mode "$HO_MODE" --argjson ho "$T_HANDOVER" --argjson ho_each "$HO_EACH" \
  --argjson b_primary "$B_PRIMARY" --argjson a_primary "$A_PRIMARY" --argjson ho_failed "$HO_FAILED" \
  --argjson ho_done "$HO_DONE" --argjson ho_stopped "$HO_STOPPED" --argjson ho_limit "$HANDOVER_LIMIT" \
  --argjson warn_a "${WARN[a]}" --argjson warn_b "${WARN[b]}" --argjson warn_c "${WARN[c]}" \
  --argjson err_a "${ERR[a]}" --argjson err_b "${ERR[b]}" --argjson err_c "${ERR[c]}" \
  --argjson warn0_a "${WARN0[a]}" --argjson warn0_b "${WARN0[b]}" --argjson warn0_c "${WARN0[c]}" \
  --argjson err0_a "${ERR0[a]}" --argjson err0_b "${ERR0[b]}" --argjson err0_c "${ERR0[c]}" \
  --argjson wall "$WALL" --arg load0 "$LOAD0" --arg load1 "$(cut -d' ' -f1-3 /proc/loadavg)" --arg logrotate "$LOGROTATE" --arg view_all_err "$VIEW_ALL_ERR" \
  --argjson du_a "${DU[a]}" --argjson du_b "${DU[b]}" --argjson du_c "${DU[c]}" \
  '{n: $n, size: $size, cores: $cores, logrotate: $logrotate,
    root_mib_at_end: {a: $du_a, b: $du_b, c: $du_c},
    view_all_error: (if $view_all_err == "" then null else $view_all_err end),
    create_secs: $create, join_uptodate_secs: $uptodate, joins_issued_secs: $joined, joins_refused: $join_failed,
    idle: {secs: $idle, settle_secs: $settle,
           a: {cpu_pct: $cpu_a, rss_kib: $rss_a, threads: $thr_a, open_files: $fds_a},
           b: {cpu_pct: $cpu_b, rss_kib: $rss_b, threads: $thr_b, open_files: $fds_b},
           c: {cpu_pct: $cpu_c, rss_kib: $rss_c, threads: $thr_c, open_files: $fds_c}},
    propagation_ms: {median: $prop_med, worst: $prop_max, rounds: $rounds, command_ms: $prop_cmd},
    handover: {mode: $ho_mode, secs: $ho, attempted: $ho_done, stopped_at_limit: ($ho_stopped == 1),
               limit_secs: $ho_limit, per_resource_secs: $ho_each, b_primary: $b_primary,
               a_still_primary: $a_primary, refused: $ho_failed},
    log_lines: {before_handover: {a: {warn: $warn0_a, error: $err0_a}, b: {warn: $warn0_b, error: $err0_b}, c: {warn: $warn0_c, error: $err0_c}},
                total: {a: {warn: $warn_a, error: $err_a}, b: {warn: $warn_b, error: $err_b}, c: {warn: $warn_c, error: $err_c}}},
    wall_secs: $wall, loadavg: {start: $load0, end: $load1}}')
if [ -n "$JSON_OUT" ]; then
  echo "$JSON" >"$JSON_OUT"
  echo "  figures as JSON: $JSON_OUT"
else
  echo "$JSON"
fi
[ "$B_PRIMARY" -ge "$N" ] && [ "$JOIN_FAILED" = 0 ] || { echo "bench: the handover or a join did not complete (see above)" >&2; exit 1; }
