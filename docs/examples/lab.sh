#!/bin/bash
# A rehearsal lab on one machine: real marsd hosts alpha, beta (and gamma) on 127.0.0.41-43,
# port 7777, with mutual TLS and join tokens, and the disaster walkthroughs of
# docs/operations.md as scenarios: the lab the guide's `view` outputs come from. For practice
# before an emergency, and to see what a new release prints.
#
#   lab.sh up            alpha primary of vm1 (1 GiB file), beta its secondary, in sync
#   lab.sh site-loss     alpha dies; beta takes over (primary --force); alpha comes back
#   lab.sh split-brain   the link breaks, beta takes over, both write, the link returns;
#                        resolved by invalidate on the old primary
#   lab.sh emergency     gamma (root on a 256 MiB filesystem) fills its root: emergency mode;
#                        ended by log-rotate there and invalidate on beta
#   lab.sh orphan        beta away longer than the unreachable limit (20 s here): Orphan;
#                        invalidate
#   lab.sh adm HOST ARGS marsadm on a lab host, e.g. `lab.sh adm beta view all`
#   lab.sh down          stop everything, remove the firewall table, the mount and the directory
#
# Needs root (loop mount, nftables on loopback), qemu-io (writes through NBD) and nft.
# Binaries: $MARS_BIN (default: the directory of `marsd` in PATH, else target/debug).
# Directory: $LAB (default /tmp/mars-lab). Nothing outside it is changed except the nftables
# table `inet marslab`, which drops the peer port 7777 of the lab addresses during partitions.
set -euo pipefail

LAB=${LAB:-/tmp/mars-lab}
if [ -z "${MARS_BIN:-}" ]; then
    if command -v marsd >/dev/null; then MARS_BIN=$(dirname "$(command -v marsd)")
    else MARS_BIN=$(cd "$(dirname "$0")/../.." && pwd)/target/debug; fi
fi
declare -A IP=([alpha]=127.0.0.41 [beta]=127.0.0.42 [gamma]=127.0.0.43)
WINDOW=60

say() { printf '\n### %s\n' "$*"; }
adm() { local h=$1; shift; "$MARS_BIN/marsadm" --root "$LAB/$h/root" "$@"; }
# show HOST ARGS: the command as an operator types it, and what it prints
show() { local h=$1; shift; echo "$h# marsadm $*"; adm "$h" "$@" 2>&1 || true; echo; }

start() { # start HOST [VAR=VALUE…]: marsd with the given environment
    local h=$1; shift
    mkdir -p "$LAB/$h/root"
    env MARS_LOG=info "$@" setsid "$MARS_BIN/marsd" --root "$LAB/$h/root" --host "$h" \
        --listen "${IP[$h]}:7777" --nbd-listen "${IP[$h]}:10809" --device none \
        --device-dir "$LAB/$h/dev" >>"$LAB/$h/marsd.log" 2>&1 </dev/null &
    echo $! >"$LAB/$h/pid"
    for _ in $(seq 300); do adm "$h" view >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "marsd $h did not come up:"; tail "$LAB/$h/marsd.log"; exit 1
}
running() { [ -f "$LAB/$1/pid" ] && kill -0 "$(cat "$LAB/$1/pid")" 2>/dev/null; }
stop() { # stop HOST [SIGNAL]
    running "$1" || return 0
    local pid; pid=$(cat "$LAB/$1/pid"); kill "-${2:-TERM}" "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}
disk() { truncate -s "$3" "$LAB/$1/$2.img"; echo "$LAB/$1/$2.img"; }
# write HOST RES OFFSET LEN BYTE: LEN bytes of BYTE at OFFSET through the primary's NBD socket
write() { qemu-io -f raw -c "write -P $5 $3 $4" "nbd+unix:///$2?socket=$LAB/$1/root/nbd.sock" >/dev/null; }
join_cluster() { adm "$1" join-cluster "${IP[alpha]}" --token "$(adm alpha join-token)" >/dev/null; adm "$1" wait-cluster >/dev/null; }
partition() { # cut the peer links of the given hosts (marsd connects from 127.0.0.1: match the port)
    nft add table inet marslab
    nft 'add chain inet marslab in { type filter hook input priority 0; }'
    for h in "$@"; do
        nft add rule inet marslab in ip daddr "${IP[$h]}" tcp dport 7777 drop
        nft add rule inet marslab in ip saddr "${IP[$h]}" tcp sport 7777 drop
    done
}
heal() { nft delete table inet marslab 2>/dev/null || true; }
waitfor() { echo "(waiting $1 s: $2)"; sleep "$1"; }

up() {
    command -v qemu-io >/dev/null || { echo "qemu-io is needed (qemu-utils)"; exit 1; }
    [ -e "$LAB" ] && { echo "$LAB exists: lab.sh down first"; exit 1; }
    mkdir -p "$LAB"
    start alpha; start beta
    say "the cluster"
    show alpha create-cluster
    join_cluster beta
    show beta view all
    say "vm1: alpha primary, beta secondary"
    show alpha create-resource vm1 "$(disk alpha vm1 1G)"
    write alpha vm1 0 256M 0x11
    show beta join-resource vm1 "$(disk beta vm1 1G)"
    adm beta --timeout 120 wait-resource vm1 uptodate
    show alpha view vm1
    show beta view vm1
}

site_loss() {
    say "alpha dies (kill -9) right after a write"
    write alpha vm1 0 32M 0x21; adm beta --timeout 30 wait-resource vm1 uptodate
    stop alpha KILL
    sleep 3; show beta view vm1
    waitfor $((WINDOW + 5)) "alpha not heard from for --window"
    show beta view vm1
    say "failover to beta"
    show beta primary --force vm1
    show beta pause-fetch vm1
    show beta primary --force vm1
    show beta view vm1
    write beta vm1 0 16M 0x22
    say "alpha comes back"
    start alpha; sleep 3
    show alpha view vm1
    show beta view vm1
}

primary_of() { adm alpha view-primarynode vm1 2>/dev/null || adm beta view-primarynode vm1; }

split_brain() {
    local old new
    old=$(primary_of); if [ "$old" = alpha ]; then new=beta; else new=alpha; fi
    say "the link breaks; $old (primary) keeps writing"
    partition alpha beta
    write "$old" vm1 0 8M 0x31
    waitfor $((WINDOW + 5)) "both sides see the other as gone"
    show "$old" view vm1
    show "$new" view vm1
    say "$new takes over and writes"
    show "$new" pause-fetch vm1
    show "$new" primary --force vm1
    write "$new" vm1 32M 24M 0x32
    write "$old" vm1 64M 4M 0x33
    say "the link returns"
    heal; sleep 6
    show "$old" view vm1
    show "$new" view vm1
    say "keep $new's history: invalidate $old"
    show "$old" invalidate vm1
    adm "$old" --timeout 300 wait-resource vm1 uptodate
    show "$old" view vm1
}

emergency() {
    say "gamma: its root on a 256 MiB filesystem, emergency mode below 40 MiB free"
    mkdir -p "$LAB/gamma/root"
    truncate -s 256M "$LAB/gamma-root.img"; mkfs.ext4 -q -F "$LAB/gamma-root.img"
    mount -o loop "$LAB/gamma-root.img" "$LAB/gamma/root"
    start gamma MARS_MIN_FREE_SPACE=56M MARS_EMERGENCY_FREE_SPACE=40M
    join_cluster gamma
    show gamma create-resource db1 "$(disk gamma db1 1G)"
    adm beta join-resource db1 "$(disk beta db1 1G)" >/dev/null
    adm beta --timeout 120 wait-resource db1 uptodate
    say "gamma's link breaks; it writes until its root is nearly full"
    partition gamma
    local i=0
    while [ "$(adm gamma view-diskstate db1)" != EmergencyMode ] && [ $i -lt 40 ]; do
        write gamma db1 $((i * 8))M 8M 0x41; i=$((i + 1)); sleep 0.3
    done
    write gamma db1 500M 8M 0x42 && echo "(a write in emergency mode succeeded)"
    show gamma view db1
    heal; sleep 6
    show beta view db1
    say "end the logfile in use, let the secondary go"
    show gamma log-rotate db1
    show beta invalidate db1
    sleep 4
    show gamma view db1
    adm beta --timeout 300 wait-resource db1 uptodate
    show beta view db1
}

orphan() {
    local p s
    p=$(primary_of); if [ "$p" = alpha ]; then s=beta; else s=alpha; fi
    say "$s is away longer than the unreachable limit (20 s for the demonstration)"
    show "$p" set-global-unreachable-limit-value 20
    stop "$s"
    write "$p" vm1 0 16M 0x51; adm "$p" log-rotate vm1 >/dev/null; write "$p" vm1 0 16M 0x52
    waitfor 25 "the limit passes"
    show "$p" cron
    start "$s"; sleep 3
    show "$s" view vm1
    show "$s" invalidate vm1
    adm "$s" --timeout 300 wait-resource vm1 uptodate
    show "$s" view vm1
    adm "$p" set-global-unreachable-limit-value 86400
}

down() {
    for h in alpha beta gamma; do stop "$h" KILL; done
    heal
    mountpoint -q "$LAB/gamma/root" 2>/dev/null && umount "$LAB/gamma/root"
    rm -rf "$LAB"
}

case "${1:-}" in
    up) up ;;
    site-loss) site_loss ;;
    split-brain) split_brain ;;
    emergency) emergency ;;
    orphan) orphan ;;
    adm) shift; adm "$@" ;;
    down) down ;;
    *) sed -n '2,21p' "$0"; exit 2 ;;
esac
