#!/usr/bin/env bash
# Load benchmark: launchday beside nginx and HAProxy in the same run, with
# ../shared/bench/run.sh (one server worker pinned to CPU 0, wrk/h2load and the origin
# on CPU 1, A B A B rounds; read the ratio column).
#
#   benches/load.sh [SCENARIO...]        default: maint proxy tls-maint tls-proxy
#   DUR=5 ROUNDS=1 CONCS=64 benches/load.sh proxy      # a quick look
#   SCHEDULING=throughput benches/load.sh maint         # launchday with `scheduling = "throughput"`
#   BUSY_POLL=100us benches/load.sh tls-maint           # launchday with `busy_poll = "100us"`
#
# Needs Debian's nginx haproxy wrk nghttp2-client (installed here when missing).
# Builds the release binary first; the driver then waits for a quiet machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${BENCH_DIR:-$ROOT/../shared/bench}
need=()
for p in nginx haproxy wrk nghttp2-client; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if ((${#need[@]})); then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; fi
(cd "$ROOT" && cargo build --release ${LAUNCHDAY_FEATURES:+--features "$LAUNCHDAY_FEATURES"})
B=${LAUNCHDAY_BIN:-$ROOT/target/release/launchday}
if [[ -n ${SCHEDULING:-} || -n ${BUSY_POLL:-} ]]; then
  # The harness writes the config; put the top-level keys in front of its tables.
  W=$(mktemp /tmp/launchday-sched.XXXXXX)
  {
    printf '#!/bin/sh\n'
    [[ -n ${SCHEDULING:-} ]] && printf 'sed -i "1i scheduling = \\"%s\\"" "$3"\n' "$SCHEDULING"
    [[ -n ${BUSY_POLL:-} ]] && printf 'sed -i "1i busy_poll = \\"%s\\"" "$3"\n' "$BUSY_POLL"
    printf 'exec %q "$@"\n' "$B"
  } >"$W"
  chmod +x "$W"
  B=$W
  export CAND_NAME="launchday${SCHEDULING:+-$SCHEDULING}${BUSY_POLL:+-bp$BUSY_POLL}"
fi
C=$(realpath "$BENCH/launchday-cand.sh")
export CAND_NAME=${CAND_NAME:-launchday}
export CAND_MAINT="$C $B maint" CAND_PROXY="$C $B proxy"
export CAND_TLS_MAINT="$C $B tls-maint" CAND_TLS_PROXY="$C $B tls-proxy"
(($#)) || set -- maint proxy tls-maint tls-proxy
exec "$BENCH/run.sh" "$@"
