# Shared by the benchmark scripts (sourced): how a figure is recorded for `bench/run`.
#
#   bench_record ID FIGURE UNIT BETTER TARGET PEER "OURS RUNS…" "PEER RUNS…"
#
# appends one JSON line to $BENCH_OUT when it is set (a script run alone prints its own text
# and records nothing). BETTER is `higher` (rates: ratio = ours / peer) or `lower` (times:
# ratio = peer / ours, "times faster"); TARGET is the issue's aim for that ratio (`null`: only
# reported). The runs are the raw per-run figures, in the order measured (alternating with the
# peer's), so that `bench/run` can show the median and the spread of both sides.
bench_record() {
  [ -n "${BENCH_OUT:-}" ] || return 0
  local id=$1 figure=$2 unit=$3 better=$4 target=$5 peer=$6 ours=$7 theirs=$8
  jq -cn --arg id "$id" --arg figure "$figure" --arg unit "$unit" --arg better "$better" \
    --argjson target "$target" --arg peer "$peer" \
    --argjson ours "[$(echo $ours | tr ' ' ',')]" --argjson theirs "[$(echo $theirs | tr ' ' ',')]" \
    '{id: $id, figure: $figure, unit: $unit, better: $better, target: $target, peer: $peer,
      ours: $ours, peer_runs: $theirs}' >>"$BENCH_OUT"
}

# Timing and statistics of the runs.
now() { date +%s.%N; }
calc() { echo "$*" | bc -l; }
# median / min / max of the numbers given as arguments
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }
spread() { printf '%s\n' "$@" | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.2f..%.2f", lo, hi}'; }

# Sets BIN to MARS_BIN (prebuilt marsd and marsadm) or, when that is unset, to a release build
# made here; fails when either binary is missing. HERE is the repository.
mars_binaries() {
  if [ -n "${MARS_BIN:-}" ]; then
    BIN=$MARS_BIN
  else
    cargo build --release --quiet --manifest-path "$HERE/Cargo.toml" -p mars-daemon -p mars-cli
    BIN=${CARGO_TARGET_DIR:-$HERE/target}/release
  fi
  for b in marsd marsadm; do [ -x "$BIN/$b" ] || { echo "bench: $BIN/$b missing"; exit 1; }; done
}
