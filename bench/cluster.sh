# Shared by the benchmark scripts that run marsd hosts (sourced after BIN is set; the caller
# sets PART, the directory of the current part, before starting hosts, and stops them with
# stop_hosts in its EXIT trap): two hosts a (127.0.0.1) and b (127.0.0.2) on loopback.
declare -A PID
CHILD=""
stop_hosts() {
  for h in "${!PID[@]}"; do kill "${PID[$h]}" 2>/dev/null || true; done
  for h in "${!PID[@]}"; do wait "${PID[$h]}" 2>/dev/null || true; unset "PID[$h]"; done
}

# adm HOST ARGS…: marsadm on host a or b of the current part.
adm() { local h=$1; shift; "$BIN/marsadm" --root "$PART/$h/root" "$@"; }
# start_host NAME IP PORT
start_host() {
  local h=$1 ip=$2 port=$3
  mkdir -p "$PART/$h"
  # NBD only: no block device under /dev/mars, which other daemons on the machine may use.
  MARS_LOG=info "$BIN/marsd" --root "$PART/$h/root" --host "$h" --listen "$ip:$port" --device none 2>"$PART/$h/marsd.log" &
  PID[$h]=$!
  for _ in $(seq 200); do
    [ -S "$PART/$h/root/marsd.sock" ] && adm "$h" view >/dev/null 2>&1 && return 0
    kill -0 "${PID[$h]}" 2>/dev/null || break
    sleep 0.05
  done
  echo "bench: marsd $h did not come up:"; cat "$PART/$h/marsd.log"; exit 1
}
# A cluster of a (127.0.0.1) and b (127.0.0.2); a creates resource r on DISK.
cluster_with_resource() {
  local port=$1 disk=$2
  start_host a 127.0.0.1 "$port"
  start_host b 127.0.0.2 "$port"
  adm a create-cluster >/dev/null
  adm a create-resource r "$disk" >/dev/null
  adm b join-cluster "127.0.0.1:$port" --token "$(adm a join-token)" >/dev/null
  adm a --timeout 60 wait-cluster >/dev/null
  adm b --timeout 60 wait-cluster >/dev/null
  # b must know the resource before join-resource (and before any timer starts).
  for _ in $(seq 400); do
    [ "$(adm b get-link resource-r/primary 2>/dev/null)" = a ] && return 0
    sleep 0.05
  done
  echo "bench: resource r never reached b"; exit 1
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
    for x in a b; do echo "--- view on $x"; adm "$x" view r || true; echo "--- tail of $x's log"; tail -20 "$PART/$x/marsd.log"; done
    exit 1
  fi
}
