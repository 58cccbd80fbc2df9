# Shared by the benchmark scripts that run marsd hosts (sourced after BIN is set; the caller
# sets PART, the directory of the current part, before starting hosts, and stops them with
# stop_hosts in its EXIT trap): up to four hosts a, b, c, d on loopback (127.0.0.1 … .4), a the
# primary. PRIMARY_ARGS: extra marsd arguments for a only (e.g. --nbd-listen). HOST_NS and
# HOST_IP (by host name, optional): a host's network namespace and address instead of loopback
# (marsadm still reaches it through its Unix socket).
declare -A PID
CHILD=""
HOSTS=(a b c d)
PRIMARY_ARGS=()
declare -A HOST_NS HOST_IP
stop_hosts() {
  for h in "${!PID[@]}"; do kill "${PID[$h]}" 2>/dev/null || true; done
  for h in "${!PID[@]}"; do wait "${PID[$h]}" 2>/dev/null || true; unset "PID[$h]"; done
}

# adm HOST ARGS…: marsadm on a host of the current part.
adm() { local h=$1; shift; "$BIN/marsadm" --root "$PART/$h/root" "$@"; }
# start_host NAME IP PORT [MARSD ARGS…]
start_host() {
  local h=$1 ip=$2 port=$3
  shift 3
  mkdir -p "$PART/$h"
  # NBD only: no block device under /dev/mars, which other daemons on the machine may use.
  local ns=()
  [ -z "${HOST_NS[$h]:-}" ] || ns=(ip netns exec "${HOST_NS[$h]}")
  MARS_LOG=info ${ns[@]+"${ns[@]}"} "$BIN/marsd" --root "$PART/$h/root" --host "$h" --listen "$ip:$port" --device none "$@" \
    2>"$PART/$h/marsd.log" &
  PID[$h]=$!
  for _ in $(seq 200); do
    [ -S "$PART/$h/root/marsd.sock" ] && adm "$h" view >/dev/null 2>&1 && return 0
    kill -0 "${PID[$h]}" 2>/dev/null || break
    sleep 0.05
  done
  echo "bench: marsd $h did not come up:"; cat "$PART/$h/marsd.log"; exit 1
}
# cluster_with_resource PORT DISK [N]: a cluster of the first N hosts (default 2: a and b),
# host i on 127.0.0.i (or HOST_IP); a creates resource r on DISK; the others know r (not yet
# joined).
host_ip() { local i=$1; echo "${HOST_IP[${HOSTS[$((i - 1))]}]:-127.0.0.$i}"; }
cluster_with_resource() {
  local port=$1 disk=$2 n=${3:-2} i h
  [ "$n" -ge 2 ] && [ "$n" -le ${#HOSTS[@]} ] || { echo "bench: cluster of $n hosts: 2..${#HOSTS[@]}"; exit 1; }
  start_host a "$(host_ip 1)" "$port" ${PRIMARY_ARGS[@]+"${PRIMARY_ARGS[@]}"}
  for i in $(seq 2 "$n"); do start_host "${HOSTS[$((i - 1))]}" "$(host_ip "$i")" "$port"; done
  adm a create-cluster >/dev/null
  adm a create-resource r "$disk" >/dev/null
  for i in $(seq 2 "$n"); do
    adm "${HOSTS[$((i - 1))]}" join-cluster "$(host_ip 1):$port" --token "$(adm a join-token)" >/dev/null
  done
  for i in $(seq 1 "$n"); do adm "${HOSTS[$((i - 1))]}" --timeout 60 wait-cluster >/dev/null; done
  # Every secondary must know the resource before join-resource (and before any timer starts).
  for i in $(seq 2 "$n"); do
    h=${HOSTS[$((i - 1))]}
    for _ in $(seq 400); do
      [ "$(adm "$h" get-link resource-r/primary 2>/dev/null)" = a ] && continue 2
      sleep 0.05
    done
    echo "bench: resource r never reached $h"; exit 1
  done
}
# written_back [ROOT RES]: waits (up to 10 min) until a primary (default: a of the current
# part, resource r) has written its log back to its disk.
written_back() {
  local root=${1:-$PART/a/root} res=${2:-r}
  for _ in $(seq 12000); do
    [ "$("$BIN/marsadm" --root "$root" view-diskstate "$res" 2>/dev/null)" = UpToDate ] && return 0
    sleep 0.05
  done
  echo "bench: $root never wrote its log of $res back to its disk"; "$BIN/marsadm" --root "$root" view "$res"; exit 1
}
# bg CMD…: runs CMD in the background and waits, so that a signal reaches our trap at once.
bg() {
  local rc=0
  "$@" &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  return $rc
}
# Waits for `wait-resource r uptodate` on host h; gives up early if the replica reports STUCK.
uptodate_or_die() {
  local h=$1 secs=$2 rc=0
  local why="not up to date after $secs s"
  adm "$h" --timeout "$secs" wait-resource r uptodate &
  CHILD=$!
  # Look for STUCK every 0.5 s, but notice the end of the wait within 0.02 s: the times
  # measured here end when this function returns.
  local n=0
  while kill -0 "$CHILD" 2>/dev/null; do
    if [ $((n % 25)) = 24 ] && adm "$h" view r 2>/dev/null | grep -q STUCK; then
      kill "$CHILD" 2>/dev/null || true
      why="stuck"
      break
    fi
    n=$((n + 1))
    sleep 0.02 &
    wait $! || true
  done
  wait "$CHILD" || rc=$?
  CHILD=""
  if [ "$rc" != 0 ]; then
    echo "bench: $h $why"
    for x in "${!PID[@]}"; do echo "--- view on $x"; adm "$x" view r || true; echo "--- tail of $x's log"; tail -20 "$PART/$x/marsd.log"; done
    exit 1
  fi
}
