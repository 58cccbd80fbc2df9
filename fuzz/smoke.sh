#!/usr/bin/env bash
# Runs every fuzz target for N seconds each (default 20; the first argument overrides) and fails
# if any of them crashes, hangs (-timeout) or runs out of memory. See README.md.
#
#   fuzz/smoke.sh        # 20 s per target
#   fuzz/smoke.sh 300    # 5 min per target
set -euo pipefail

secs="${1:-20}"
case "$secs" in
'' | *[!0-9]*) echo "usage: $0 [seconds per target]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")"
# cargo-fuzz builds with -Zsanitizer=address, a nightly-only flag; only the stable toolchain is
# installed, and RUSTC_BOOTSTRAP=1 lets it accept the flag.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2
    exit 2
fi

targets=(txlog_decode txlog_reader nbd_session wire_frame tls_join meta_apply control_request template_expand)
declare -A dict=(
    [txlog_decode]=dict/txlog.dict
    [txlog_reader]=dict/txlog.dict
    [nbd_session]=dict/nbd_session.dict
    [wire_frame]=dict/wire.dict
    [tls_join]=dict/tls.dict
    [meta_apply]=dict/meta.dict
    [control_request]=dict/control.dict
    [template_expand]=dict/template.dict
)

cargo fuzz build

failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log="$(mktemp)"
    echo "== $t: ${secs}s"
    # corpus/$t collects new inputs (kept between runs, gitignored); seeds/$t is only read.
    # -timeout: one input running longer than 25 s counts as a hang (a crash).
    if cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -timeout=25 -dict="${dict[$t]}" -print_final_stats=1 \
        >"$log" 2>&1; then
        grep -E '^#[0-9]+[[:space:]]+DONE|^stat::number_of_executed_units|^stat::average_exec_per_sec' "$log" || true
        if grep -q 'did not end within' "$log"; then
            echo "   note: some sessions hit the in-target timeout (see $log)"
        else
            rm -f "$log"
        fi
    else
        echo "!! $t FAILED; last lines of $log:"
        tail -n 60 "$log"
        failed+=("$t")
    fi
done

if ((${#failed[@]})); then
    echo "crashed: ${failed[*]} (inputs in artifacts/<target>/)" >&2
    exit 1
fi
echo "all targets ran ${secs}s without a crash"
