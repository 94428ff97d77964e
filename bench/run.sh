#!/usr/bin/env bash
# bench/run.sh (`make bench`): pgbench through cascata, PgBouncer and
# PostgreSQL directly, on loopback, in one bounded run; writes bench/RESULTS.md
# (overwritten) and prints it.
#
# What it does:
#   1. a throw-away primary + streaming replica (bench/benchtool cluster, which
#      uses internal/pgcluster), project database "bench", roles authenticator
#      (NOINHERIT, SCRAM) / anon / authenticated / service_role,
#      `pgbench -i -s $BENCH_SCALE` as superuser, pgbench tables granted to
#      authenticated;
#   2. cascata (transaction mode, pool_size = $BENCH_POOL_SIZE) and Debian's
#      pgbouncer (transaction mode, default_pool_size = $BENCH_POOL_SIZE,
#      auth_type = scram-sha-256 with the SCRAM verifier, SCRAM pass-through);
#   3. memory of cascata with $BENCH_IDLE_CLIENTS idle clients holding 10
#      prepared statements each (and pgbouncer's with idle clients, and the
#      three I/O-model prototypes' with $BENCH_PROTO_IDLE_CLIENTS);
#   4. pgbench -S -M simple|extended|prepared against direct, pgbouncer,
#      cascata: TPS, latency, proxy CPU seconds per 1,000 transactions;
#      then the simple and extended rounds with every client over TLS,
#      against pgbouncer, cascata and the two loop prototypes;
#   5. a 90/10 read/write mix through cascata without replicas, with the
#      replica, and with the replica but consistency = primary_only;
#   6. connection rate (pgbench -C, `SELECT 1`) with HS256 and RS256 tokens,
#      and $BENCH_USERS connections with distinct JWTs vs one shared JWT.
#
# Environment (defaults in brackets):
#   BENCH_DURATION [15]        seconds per pgbench/load measurement
#   BENCH_SELECT_DURATION [10] seconds per select-only run; BENCH_ROUNDS [3]
#                              rounds of them, every target in turn in each
#                              round; the table shows medians over the rounds
#   BENCH_CONN_DURATION [DUR]  seconds per connection-rate measurement
#   BENCH_CLIENTS [32]  BENCH_THREADS [2]  BENCH_POOL_SIZE [20]  BENCH_SCALE [10]
#   BENCH_IDLE_CLIENTS [10000]  BENCH_USERS [1000]
#   BENCH_IDLE_SETTLE [5s]  pause before each idle-memory reading, every proxy
#   BENCH_PROTO_IDLE_CLIENTS [10000] idle clients through each prototype
#   BENCH_OUT [bench/RESULTS.md]  BENCH_KEEP=1 keeps the work dir; a section
#                       "## Scale: 1,000 projects" (bench/scale's, the last
#                       one) found in it is kept
#   CASCATA_BIN [bin/cascata]
#   CASCATA_BIN_BEFORE [unset]  a build of cascata before a change: it takes
#                       the place of the GOMAXPROCS=1 target in the
#                       select-only rounds (interleaved with the change), and
#                       the identity-switching and scrubbed-unit rows run on
#                       both builds
# Logs of every run go to bench/out/ (git-ignored).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The build measured, read now (the binary was just built): only changes to
# what goes into it count, not results, plots or docs changed meanwhile.
COMMIT=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(cd "$ROOT" && git status --porcelain --untracked-files=no -- '*.go' go.mod go.sum 2>/dev/null | grep -q . && echo " + uncommitted changes" || true)
BIN=${CASCATA_BIN:-$ROOT/bin/cascata}
BEFORE_BIN=${CASCATA_BIN_BEFORE:-}
SECOND_LABEL="cascata, GOMAXPROCS=1"
[ -n "$BEFORE_BIN" ] && SECOND_LABEL="cascata before the change"
DUR=${BENCH_DURATION:-15}
CONN_DUR=${BENCH_CONN_DURATION:-$DUR}
SEL_DUR=${BENCH_SELECT_DURATION:-10}
ROUNDS=${BENCH_ROUNDS:-3}
CLIENTS=${BENCH_CLIENTS:-32}
THREADS=${BENCH_THREADS:-2}
POOL=${BENCH_POOL_SIZE:-20}
SCALE=${BENCH_SCALE:-10}
IDLE_CLIENTS=${BENCH_IDLE_CLIENTS:-10000}
IDLE_SETTLE=${BENCH_IDLE_SETTLE:-5s}
PROTO_IDLE=${BENCH_PROTO_IDLE_CLIENTS:-10000}
IDLE_STMTS=10
USERS=${BENCH_USERS:-1000}
OUT=${BENCH_OUT:-$ROOT/bench/RESULTS.md}
# bench/scale writes its own section into the same file (the last one):
# kept as it is when this run rewrites the rest.
SCALE_SECTION=$(sed -n '/^## Scale: 1,000 projects/,$p' "$OUT" 2>/dev/null || true)
LOGDIR=$ROOT/bench/out
PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}
export PATH=/usr/local/go/bin:$PATH

# Only the variables set below may steer libpq.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^PG' || true)
export PGSSLMODE=disable PGCONNECT_TIMEOUT=10
unset CASCATA_LOG_LEVEL

say() { printf 'bench: %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

for cmd in pgbench psql curl setpriv "$PGBOUNCER"; do
  command -v "$cmd" >/dev/null || die "$cmd not found"
done
[ -x "$BIN" ] || die "$BIN missing (make build)"

START_EPOCH=$(date +%s)
WORK=$(mktemp -d /tmp/cascata-bench.XXXXXX)
chmod 755 "$WORK" # the postgres OS user must reach the cluster and pgbouncer files
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR"
CLUSTER_PID="" CASCATA_PID="" PGB_PID="" CASCATA1_PID="" RELAY_PID="" POOLG_PID="" POOLE_PID="" POOLC_PID=""
CASCATAT_PID="" PGBT_PID="" POOLET_PID="" POOLCT_PID=""

# stop_pid PID SECONDS: SIGTERM, wait, then SIGKILL.
stop_pid() {
  local pid=$1 secs=$2 i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < secs * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "pid $pid did not stop after SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT
  stop_pid "$CASCATA_PID" 15
  stop_pid "$CASCATA1_PID" 15
  stop_pid "$RELAY_PID" 5
  stop_pid "$POOLG_PID" 10
  stop_pid "$POOLE_PID" 10
  stop_pid "$POOLC_PID" 10
  stop_pid "$PGB_PID" 10
  stop_pid "$CASCATAT_PID" 15
  stop_pid "$POOLET_PID" 10
  stop_pid "$POOLCT_PID" 10
  stop_pid "$PGBT_PID" 10
  cp "$WORK"/pg/*.log "$WORK"/pgb/pgbouncer.log "$LOGDIR"/ 2>/dev/null || true
  stop_pid "$CLUSTER_PID" 90
  # A server left behind (benchtool killed) gets an immediate shutdown.
  local f pid
  for f in "$WORK"/pg/*/postmaster.pid; do
    [ -f "$f" ] || continue
    pid=$(head -n1 "$f")
    [ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null || true
  done
  if [ "${BENCH_KEEP:-0}" = 1 ]; then
    say "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Clients and proxies hold thousands of sockets.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if [ "$NOFILE" != unlimited ] && [ "$NOFILE" -lt $((IDLE_CLIENTS + 500)) ]; then
  say "ulimit -n is $NOFILE: lowering BENCH_IDLE_CLIENTS from $IDLE_CLIENTS to $((NOFILE - 500))"
  IDLE_CLIENTS=$((NOFILE - 500))
fi
if [ "$NOFILE" != unlimited ] && [ "$NOFILE" -lt $((PROTO_IDLE + 500)) ]; then
  say "ulimit -n is $NOFILE: lowering BENCH_PROTO_IDLE_CLIENTS from $PROTO_IDLE to $((NOFILE - 500))"
  PROTO_IDLE=$((NOFILE - 500))
fi

AS_PG=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || die "running as root needs the postgres OS user"
  AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups)
fi

# --- helpers ----------------------------------------------------------------

# cpu_of PID: utime+stime in seconds ("" without a pid).
cpu_of() {
  [ -n "${1:-}" ] || { echo ""; return; }
  sed 's/.*) //' "/proc/$1/stat" | awk '{printf "%.2f", ($12 + $13) / 100}'
}
rss_of() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
# wait_healthy ADMIN_PORT PID LOG: until cascata's /healthz answers (30 s).
wait_healthy() {
  for _ in $(seq 1 300); do
    curl -fsS --max-time 1 "http://127.0.0.1:$1/healthz" >/dev/null 2>&1 && return 0
    alive "$2" || { tail -n 30 "$3" >&2; die "cascata exited (see $3)"; }
    sleep 0.1
  done
  die "cascata not healthy after 30 s (see $3)"
}

# redact: hide passwords and tokens in recorded commands.
redact() {
  local s=$*
  s=${s//$PASSWORD/<password>}
  [ -n "${TOKEN:-}" ] && s=${s//$TOKEN/<jwt HS256>}
  [ -n "${TOKEN_REP:-}" ] && s=${s//$TOKEN_REP/<jwt HS256>}
  [ -n "${TOKEN_PO:-}" ] && s=${s//$TOKEN_PO/<jwt HS256>}
  [ -n "${TOKEN_EV:-}" ] && s=${s//$TOKEN_EV/<jwt HS256>}
  [ -n "${TOKEN_RS:-}" ] && s=${s//$TOKEN_RS/<jwt RS256>}
  printf '%s' "$s"
}

COMMANDS=$LOGDIR/commands.txt
: >"$COMMANDS"
RESULTS=$LOGDIR/results.tsv
: >"$RESULTS"

# mallocs_of PID: the Go heap allocations so far (go_memstats_mallocs_total
# of the admin plane's /metrics) of a cascata process, "" for anything else.
mallocs_of() {
  local port=""
  [ -n "${1:-}" ] || return 0
  [ "$1" = "${CASCATA_PID:-}" ] && port=$ADMIN_PORT
  [ "$1" = "${CASCATA1_PID:-}" ] && port=$ADMIN1_PORT
  [ "$1" = "${CASCATAT_PID:-}" ] && port=$ADMINT_PORT
  [ -n "$port" ] || return 0
  curl -fsS --max-time 5 -H "Authorization: Bearer $BENCH_ADMIN_TOKEN" "http://127.0.0.1:$port/metrics" 2>/dev/null |
    awk '$1 == "go_memstats_mallocs_total" {printf "%.0f", $2}'
}

# run_pgbench ID PROXY_PID ENV... pgbench ARGS...: runs pgbench (bounded),
# records TPS, latency, transactions, failures, the proxy's CPU seconds and
# (cascata) its heap allocations per transaction.
run_pgbench() {
  local id=$1 pid=$2
  shift 2
  local out=$LOGDIR/$id.out err=$LOGDIR/$id.err rc=0 c0 c1 m0 m1
  echo "$id: $(redact "$*")" >>"$COMMANDS"
  say "run $id"
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  m0=$(mallocs_of "$pid")
  c0=$(cpu_of "$pid")
  local longest=$((DUR > CONN_DUR ? DUR : CONN_DUR))
  longest=$((SEL_DUR > longest ? SEL_DUR : longest))
  timeout -k 5 $((longest + 120)) env "$@" >"$out" 2>"$err" || rc=$?
  c1=$(cpu_of "$pid")
  m1=$(mallocs_of "$pid")
  local tps lat txns failed aborted cpu="" per1k="" note="" allocs=""
  tps=$(grep -m1 -oP '^tps = \K[0-9.]+' "$out" || true)
  lat=$(grep -m1 -oP '^latency average = \K[0-9.]+' "$out" || true)
  txns=$(grep -m1 -oP '^number of transactions actually processed: \K[0-9]+' "$out" || true)
  failed=$(grep -m1 -oP '^number of failed transactions: \K[0-9]+' "$out" || echo 0)
  # Clients that stopped with an error ("client N ... aborted", "client N command M: no results").
  aborted=$({ grep -oP '^pgbench: error: client \K[0-9]+' "$err" || true; } | sort -u | wc -l)
  if [ -n "$pid" ]; then
    cpu=$(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.2f", b - a}')
    if [ -n "$txns" ] && [ "$txns" -gt 0 ]; then
      per1k=$(awk -v c="$cpu" -v t="$txns" 'BEGIN {printf "%.4f", c * 1000 / t}')
    fi
  fi
  if [ -n "$m0" ] && [ -n "$m1" ] && [ -n "$txns" ] && [ "$txns" -gt 0 ]; then
    allocs=$(awk -v a="$m0" -v b="$m1" -v t="$txns" 'BEGIN {printf "%.2f", (b - a) / t}')
  fi
  if [ "$rc" != 0 ] || [ "$aborted" != 0 ]; then
    note="exit $rc; $(grep -m1 -E 'error|ERROR|FATAL' "$err" | sed 's/|/\\|/g' | cut -c1-220 || true)"
  fi
  if [ -n "$pid" ] && ! alive "$pid"; then
    note="$note; PROXY DIED (pid $pid)"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "${tps:-}" "${lat:-}" "${txns:-}" "$failed" "$aborted" "$cpu" "$per1k" "$rc" "$note" "$load" "$per1k" "$per1k" "$allocs" >>"$RESULTS"
}

# median_row ID: a row ID made of the rows ID-r1, ID-r2, ...: the medians
# of TPS, latency and CPU per 1,000 over the rounds, totals of the counts.
median_row() {
  awk -F'\t' -v id="$1" '
    function med(a, n,   i, j, t) {
      for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
      return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    index($1, id "-r") == 1 && substr($1, length(id) + 3) ~ /^[0-9]+$/ {
      n++
      if ($2 != "") tps[++nt] = $2 + 0
      if ($3 != "") lat[++nl] = $3 + 0
      if ($8 != "") {
        per[++np] = $8 + 0
        if (np == 1 || $8 + 0 < lo) lo = $8 + 0
        if (np == 1 || $8 + 0 > hi) hi = $8 + 0
      }
      if ($11 != "") load[++nd] = $11 + 0
      if ($14 != "") al[++na] = $14 + 0
      txns += $4; failed += $5; aborted += $6; cpu += $7
      if ($9 != 0) rc = $9
    }
    END {
      if (!n) exit
      # No note: the failures list names the rounds themselves.
      printf "%s\t%s\t%s\t%d\t%d\t%d\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n", id,
        nt ? sprintf("%.1f", med(tps, nt)) : "", nl ? sprintf("%.3f", med(lat, nl)) : "",
        txns, failed, aborted, (cpu != 0 ? sprintf("%.2f", cpu) : ""), np ? sprintf("%.4f", med(per, np)) : "", rc, "",
        nd ? sprintf("%.2f", med(load, nd)) : "", np ? sprintf("%.4f", lo) : "", np ? sprintf("%.4f", hi) : "",
        na ? sprintf("%.2f", med(al, na)) : ""
    }' "$RESULTS" >>"$RESULTS"
}
# round_ratios A B COLUMN: the per-round ratios A/B of a column ("0.81 0.86 0.90").
round_ratios() {
  local r out=""
  for r in $(seq 1 "$ROUNDS"); do
    out="$out $(ratio "$(field "$1-r$r" "$3")" "$(field "$2-r$r" "$3")")"
  done
  printf '%s' "${out# }"
}

# field ID COLUMN: a column of results.tsv (2 tps, 3 lat, 4 txns, 5 failed,
# 6 aborted, 7 cpu, 8 cpu/1k, 9 rc, 10 note, 11 load average (1 min) at the
# start, 12 and 13 the lowest and highest cpu/1k over the rounds, 14 heap
# allocations per transaction, cascata only).
field() { awk -F'\t' -v id="$1" -v c="$2" '$1 == id {print $c}' "$RESULTS"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "" || b == "" || b + 0 == 0) print "n/a"; else printf "%.2f", a / b}'; }
kv() { grep -m1 "^$2=" "$1" | cut -d= -f2- || true; }
# median_kv FILE...: the key=value outputs of benchtool load runs as one,
# every numeric value the median over the files, errors their total, the
# first error the first one seen.
median_kv() {
  awk -F= '
    function med(a, n,   i, j, t) {
      for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
      return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    NF < 2 { next }
    {
      k = $1; v = substr($0, length(k) + 2)
      if (!(k in seen)) { seen[k] = 1; order[++nk] = k }
      if (k == "errors") { total[k] += v; next }
      if (k == "first_error") { if (first == "") first = v; next }
      if (v ~ /^-?[0-9.]+$/) vals[k, ++cnt[k]] = v + 0
      else if (!(k in text)) text[k] = v
    }
    END {
      for (i = 1; i <= nk; i++) {
        k = order[i]
        if (k == "errors") { print k "=" total[k] + 0; continue }
        if (k == "first_error") { if (first != "") print k "=" first; continue }
        if (cnt[k] > 0) {
          delete a
          for (j = 1; j <= cnt[k]; j++) a[j] = vals[k, j]
          printf "%s=%.10g\n", k, med(a, cnt[k])
        } else print k "=" text[k]
      }
    }' "$@"
}

# route_snapshot FILE: cascata_route_decisions_total lines from /metrics.
route_snapshot() {
  curl -fsS --max-time 10 -H "Authorization: Bearer $BENCH_ADMIN_TOKEN" "http://127.0.0.1:$ADMIN_PORT/metrics" |
    grep '^cascata_route_decisions_total' >"$1" || true
}
# route_delta BEFORE AFTER PROJECT: "target reason count" lines.
route_delta() {
  awk -v p="project=\"$3\"" '
    function parse(line,   lbl) {
      lbl = line; sub(/^[^{]*\{/, "", lbl); sub(/\}.*$/, "", lbl)
      return lbl
    }
    FNR == NR { if (index($0, p)) before[parse($0)] = $NF; next }
    index($0, p) {
      l = parse($0); d = $NF - before[l]
      if (d > 0) {
        t = l; sub(/.*target="/, "", t); sub(/".*/, "", t)
        r = l; sub(/.*reason="/, "", r); sub(/".*/, "", r)
        printf "%s %s %d\n", t, r, d
      }
    }' "$1" "$2"
}

# --- 1. PostgreSQL primary + replica -----------------------------------------

say "building bench/benchtool"
(cd "$ROOT" && go build -o "$WORK/benchtool" ./bench/benchtool) || die "go build ./bench/benchtool"
TOOL=$WORK/benchtool
read -r CASCATA_PORT ADMIN_PORT PGB_PORT CASCATA1_PORT ADMIN1_PORT RELAY_PORT POOLG_PORT POOLE_PORT \
  CASCATAT_PORT ADMINT_PORT PGBT_PORT POOLET_PORT POOLC_PORT POOLCT_PORT < <("$TOOL" ports 14 | paste -sd' ')

PASSWORD=$(head -c 18 /dev/urandom | base64 | tr '+/' 'xy')
export BENCH_JWT_SECRET
BENCH_JWT_SECRET=$(head -c 32 /dev/urandom | base64 | tr '+/' 'xy')
export BENCH_ADMIN_TOKEN
BENCH_ADMIN_TOKEN=$(head -c 24 /dev/urandom | base64 | tr '+/' 'xy')

say "starting primary + streaming replica"
"$TOOL" cluster -dir "$WORK/pg" -db bench -password "$PASSWORD" -env "$WORK/cluster.env" >"$LOGDIR/cluster.log" 2>&1 &
CLUSTER_PID=$!
for _ in $(seq 1 1200); do
  [ -f "$WORK/cluster.env" ] && break
  alive "$CLUSTER_PID" || { tail -n 30 "$LOGDIR/cluster.log" >&2; die "cluster did not start"; }
  sleep 0.1
done
[ -f "$WORK/cluster.env" ] || die "cluster not ready after 120 s"
# shellcheck disable=SC1091
. "$WORK/cluster.env"
PP=$PRIMARY_PORT
RP=$REPLICA_PORT
SU=(-h 127.0.0.1 -p "$PP" -U postgres)

say "pgbench -i -s $SCALE"
pgbench -i -s "$SCALE" -q "${SU[@]}" bench >"$LOGDIR/pgbench-init.log" 2>&1 || { tail "$LOGDIR/pgbench-init.log" >&2; die "pgbench -i"; }
psql -X -q -v ON_ERROR_STOP=1 "${SU[@]}" -d bench >"$LOGDIR/setup.log" 2>&1 <<'SQL' || die "grants (see $LOGDIR/setup.log)"
GRANT SELECT, INSERT, UPDATE ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO authenticated;
CREATE EXTENSION IF NOT EXISTS pg_prewarm;
SELECT pg_prewarm('pgbench_accounts'), pg_prewarm('pgbench_accounts_pkey');
CHECKPOINT;
SQL
PG_VERSION=$(psql -X -Atc 'SHOW server_version' "${SU[@]}" -d bench)
# The replica has replayed the data before it is read from.
for _ in $(seq 1 600); do
  lag=$(psql -X -Atc "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) FROM pg_stat_replication" "${SU[@]}" -d postgres | awk 'NR == 1')
  [ "${lag:-1}" = 0 ] && break
  sleep 0.1
done
psql -X -Atc "SELECT pg_prewarm('pgbench_accounts'), pg_prewarm('pgbench_accounts_pkey')" -h 127.0.0.1 -p "$RP" -U postgres bench >/dev/null 2>&1 || true

# --- 2. cascata and pgbouncer -------------------------------------------------

mkdir -p "$WORK/state" "$WORK/storage"
RS_JWKS=$WORK/jwks.json
TOKEN_RS=$("$TOOL" rsakey -jwks "$RS_JWKS" -project benchrs -role authenticated) || die "rsakey"
DBURL="postgres://authenticator:$PASSWORD@127.0.0.1:$PP/bench"
REPURL="postgres://authenticator:$PASSWORD@127.0.0.1:$RP/bench"
OWNURL="postgres://postgres@127.0.0.1:$PP/bench"
CFG=$WORK/cascata.toml
project() { # project REF EXTRA-LINES
  cat <<EOF

[[projects]]
ref = "$1"
database_url = "$DBURL"
owner_url = "$OWNURL"
pool_size = $POOL
storage_dir = "$WORK/storage/$1"
$2
EOF
}
{
  cat <<EOF
[proxy]
listen = "127.0.0.1:$CASCATA_PORT"
pool_mode = "transaction"
max_client_conn = $((IDLE_CLIENTS + USERS + 1000))
max_server_conn_per_host = $((POOL * 5 + 20))
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"
token_env = "BENCH_ADMIN_TOKEN"

[state]
dir = "$WORK/state"
EOF
  project bench 'jwt_secret_env = "BENCH_JWT_SECRET"'
  project benchrep "jwt_secret_env = \"BENCH_JWT_SECRET\"
replica_urls = [\"$REPURL\"]"
  project benchev "jwt_secret_env = \"BENCH_JWT_SECRET\"
replica_urls = [\"$REPURL\"]
consistency = \"eventual\""
  project benchpo "jwt_secret_env = \"BENCH_JWT_SECRET\"
replica_urls = [\"$REPURL\"]
consistency = \"primary_only\""
  project benchrs "jwks_file = \"$RS_JWKS\""
} >"$CFG"
"$BIN" check -config "$CFG" >"$LOGDIR/check.log" 2>&1 || { cat "$LOGDIR/check.log" >&2; die "cascata check"; }

# start_cascata: a fresh cascata process on $CASCATA_PORT (log appended).
start_cascata() {
  say "starting cascata on 127.0.0.1:$CASCATA_PORT (admin $ADMIN_PORT)"
  "$BIN" serve -config "$CFG" >>"$LOGDIR/cascata.log" 2>&1 &
  CASCATA_PID=$!
  wait_healthy "$ADMIN_PORT" "$CASCATA_PID" "$LOGDIR/cascata.log"
}
start_cascata
TOKEN=$("$BIN" token -config "$CFG" -project bench -role authenticated -sub bench-user -ttl 2h)
TOKEN_REP=$("$BIN" token -config "$CFG" -project benchrep -role authenticated -sub bench-user -ttl 2h)
TOKEN_PO=$("$BIN" token -config "$CFG" -project benchpo -role authenticated -sub bench-user -ttl 2h)
TOKEN_EV=$("$BIN" token -config "$CFG" -project benchev -role authenticated -sub bench-user -ttl 2h)

mkdir -p "$WORK/pgb"
# The SCRAM verifier, as PostgreSQL stores it: pgbouncer checks clients
# against it and passes their SCRAM keys through to the server.
VERIFIER=$(psql -X -Atc "SELECT rolpassword FROM pg_authid WHERE rolname = 'authenticator'" "${SU[@]}" -d postgres)
printf '"authenticator" "%s"\n' "$VERIFIER" >"$WORK/pgb/userlist.txt"
cat >"$WORK/pgb/pgbouncer.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$PP dbname=bench connect_query='SET ROLE authenticated'

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/pgb/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = $((IDLE_CLIENTS + 1000))
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
logfile = $WORK/pgb/pgbouncer.log
EOF
[ ${#AS_PG[@]} -gt 0 ] && chown -R postgres: "$WORK/pgb"
# start_pgbouncer: a fresh pgbouncer process on $PGB_PORT.
start_pgbouncer() {
  say "starting pgbouncer on 127.0.0.1:$PGB_PORT"
  "${AS_PG[@]}" "$PGBOUNCER" "$WORK/pgb/pgbouncer.ini" >>"$LOGDIR/pgbouncer.stderr" 2>&1 &
  PGB_PID=$!
  for _ in $(seq 1 100); do
    PGPASSWORD=$PASSWORD psql -X -Atc 'SELECT 1' -h 127.0.0.1 -p "$PGB_PORT" -U authenticator bench >/dev/null 2>&1 && return
    alive "$PGB_PID" || { cat "$LOGDIR/pgbouncer.stderr" "$WORK/pgb/pgbouncer.log" >&2 || true; die "pgbouncer exited"; }
    sleep 0.1
  done
  die "pgbouncer did not answer within 10 s"
}
start_pgbouncer

# Sanity: each path answers as the right role. A failure is recorded (and
# the runs through that path will show it) rather than ending the bench.
PROBLEMS=$LOGDIR/problems.txt
: >"$PROBLEMS"
check_role() {
  local who=$1
  shift
  local got
  got=$(env "$@" psql -X -Atc 'SELECT current_user' 2>&1 | tail -n1 || true)
  if [ "$got" != authenticated ]; then
    say "$who: psql -c 'SELECT current_user' gave: $got"
    echo "$who: \`psql -X -Atc 'SELECT current_user'\` printed: $got" >>"$PROBLEMS"
  fi
}
check_role direct PGPASSWORD="$PASSWORD" PGOPTIONS='-c role=authenticated' PGHOST=127.0.0.1 PGPORT="$PP" PGUSER=authenticator PGDATABASE=bench
check_role pgbouncer PGPASSWORD="$PASSWORD" PGHOST=127.0.0.1 PGPORT="$PGB_PORT" PGUSER=authenticator PGDATABASE=bench
check_role cascata PGPASSWORD="$TOKEN" PGHOST=127.0.0.1 PGPORT="$CASCATA_PORT" PGUSER=authenticated PGDATABASE=bench

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# --- 3. memory with idle clients (first, on a fresh cascata) ------------------

say "idle clients: $IDLE_CLIENTS through cascata, $IDLE_STMTS prepared statements each"
IDLE_C=$LOGDIR/idle-cascata.out
export BENCH_TOKEN=$TOKEN
echo "idle-cascata: benchtool idle -settle $IDLE_SETTLE -addr 127.0.0.1:$CASCATA_PORT -db bench -user authenticated -password-env BENCH_TOKEN -n $IDLE_CLIENTS -stmts $IDLE_STMTS -pid <cascata>" >>"$COMMANDS"
timeout -k 5 600 "$TOOL" idle -settle "$IDLE_SETTLE" -addr "127.0.0.1:$CASCATA_PORT" -db bench -user authenticated -password-env BENCH_TOKEN \
  -n "$IDLE_CLIENTS" -stmts "$IDLE_STMTS" -pid "$CASCATA_PID" \
  -metrics-url "http://127.0.0.1:$ADMIN_PORT/metrics" -metrics-token-env BENCH_ADMIN_TOKEN >"$IDLE_C" 2>"$LOGDIR/idle-cascata.err" ||
  say "idle (cascata) failed: $(tail -n3 "$LOGDIR/idle-cascata.err")"
say "idle clients: $IDLE_CLIENTS through pgbouncer (no prepared statements: 1.18 cannot keep them)"
IDLE_B=$LOGDIR/idle-pgbouncer.out
export BENCH_PW=$PASSWORD
echo "idle-pgbouncer: benchtool idle -settle $IDLE_SETTLE -addr 127.0.0.1:$PGB_PORT -db bench -user authenticator -password-env BENCH_PW -n $IDLE_CLIENTS -stmts 0 -pid <pgbouncer>" >>"$COMMANDS"
timeout -k 5 600 "$TOOL" idle -settle "$IDLE_SETTLE" -addr "127.0.0.1:$PGB_PORT" -db bench -user authenticator -password-env BENCH_PW \
  -n "$IDLE_CLIENTS" -stmts 0 -pid "$PGB_PID" >"$IDLE_B" 2>"$LOGDIR/idle-pgbouncer.err" ||
  say "idle (pgbouncer) failed: $(tail -n3 "$LOGDIR/idle-pgbouncer.err")"
# The three I/O-model prototypes (transaction pooling, no client
# authentication; see RESULTS.md), each with $PROTO_IDLE idle clients.
# proto_port/proto_pid KIND: a prototype's port and process.
proto_port() {
  case $1 in goroutine) echo "$POOLG_PORT" ;; eventloop) echo "$POOLE_PORT" ;; coro) echo "$POOLC_PORT" ;; esac
}
proto_pid() {
  case $1 in goroutine) echo "$POOLG_PID" ;; eventloop) echo "$POOLE_PID" ;; coro) echo "$POOLC_PID" ;; esac
}
# start_protos: all afresh, logged in to the primary with $POOL server
# connections each.
# start_proto KIND PORT LOG [FLAGS...]: one prototype in the background,
# logged in with $POOL server connections, logging to $LOGDIR/LOG.log; its
# process is PROTO_PID.
start_proto() {
  local kind=$1 port=$2 log=$3
  shift 3
  "$TOOL" "pool-$kind" -listen "127.0.0.1:$port" -target "127.0.0.1:$PP" -db bench -user authenticator \
    -password-env BENCH_PW -role authenticated -pool "$POOL" -dur 2h "$@" >>"$LOGDIR/$log.log" 2>&1 &
  PROTO_PID=$!
}
start_protos() {
  local kind port
  for kind in goroutine eventloop coro; do
    start_proto "$kind" "$(proto_port $kind)" "pool-$kind"
    case $kind in goroutine) POOLG_PID=$PROTO_PID ;; eventloop) POOLE_PID=$PROTO_PID ;; coro) POOLC_PID=$PROTO_PID ;; esac
  done
  for port in "$POOLG_PORT" "$POOLE_PORT" "$POOLC_PORT"; do
    for _ in $(seq 1 100); do
      psql -X -Atc 'SELECT 1' -h 127.0.0.1 -p "$port" -U authenticator bench >/dev/null 2>&1 && continue 2
      sleep 0.1
    done
    die "prototype on port $port did not answer within 10 s (see $LOGDIR/pool-*.log)"
  done
}
stop_protos() {
  stop_pid "$POOLG_PID" 10
  stop_pid "$POOLE_PID" 10
  stop_pid "$POOLC_PID" 10
  POOLG_PID="" POOLE_PID="" POOLC_PID=""
}
start_protos
for kind in goroutine eventloop coro; do
  pid=$(proto_pid $kind) port=$(proto_port $kind)
  say "idle clients: $PROTO_IDLE through pool-$kind"
  echo "idle-pool-$kind: benchtool idle -settle $IDLE_SETTLE -addr 127.0.0.1:$port -db bench -user authenticator -n $PROTO_IDLE -stmts 0 -pid <pool-$kind>" >>"$COMMANDS"
  timeout -k 5 600 "$TOOL" idle -settle "$IDLE_SETTLE" -addr "127.0.0.1:$port" -db bench -user authenticator \
    -n "$PROTO_IDLE" -stmts 0 -pid "$pid" >"$LOGDIR/idle-pool-$kind.out" 2>"$LOGDIR/idle-pool-$kind.err" ||
    say "idle (pool-$kind) failed: $(tail -n3 "$LOGDIR/idle-pool-$kind.err")"
done
stop_protos
# Every target meets the select-only rounds in the same fresh conditions:
# no proxy carries what the idle clients left (thousands of closed
# sockets, a grown heap), so both proxies start again.
stop_pid "$PGB_PID" 10
start_pgbouncer
stop_pid "$CASCATA_PID" 15
start_cascata

# --- 4. select-only: direct, pgbouncer, cascata --------------------------------

# Two more targets put the numbers in context: the same cascata limited to
# one thread running Go code at a time (GOMAXPROCS=1; pgbouncer is one
# thread), and a plain Go byte relay (benchtool relay: read/write per
# client with the same socket calls as cascata, one server connection
# each, no protocol work), the floor of any proxy built on Go's network
# poller on this machine.
CFG1=$WORK/cascata-gomaxprocs1.toml
mkdir -p "$WORK/state1"
sed -e "s#127.0.0.1:$CASCATA_PORT#127.0.0.1:$CASCATA1_PORT#; s#127.0.0.1:$ADMIN_PORT#127.0.0.1:$ADMIN1_PORT#; s#$WORK/state\"#$WORK/state1\"#" "$CFG" >"$CFG1"
if [ -n "$BEFORE_BIN" ]; then
  "$BEFORE_BIN" serve -config "$CFG1" >"$LOGDIR/cascata-gomaxprocs1.log" 2>&1 &
else
  GOMAXPROCS=1 "$BIN" serve -config "$CFG1" >"$LOGDIR/cascata-gomaxprocs1.log" 2>&1 &
fi
CASCATA1_PID=$!
"$TOOL" relay -listen "127.0.0.1:$RELAY_PORT" -target "127.0.0.1:$PP" -dur 2h >"$LOGDIR/relay.log" 2>&1 &
RELAY_PID=$!
start_protos
wait_healthy "$ADMIN1_PORT" "$CASCATA1_PID" "$LOGDIR/cascata-gomaxprocs1.log"

# The machine's speed drifts between runs (a shared VM): every target runs
# once per round, in turn, and the table shows each one's median round.
PGB_ARGS=(-n -S -c "$CLIENTS" -j "$THREADS" -T "$SEL_DUR")
SEL_TARGETS=(direct pgbouncer cascata cascata1 relay poolg poole poolc)
for round in $(seq 1 "$ROUNDS"); do
  for mode in simple extended prepared; do
    run_pgbench "direct-$mode-r$round" "" PGPASSWORD="$PASSWORD" PGOPTIONS='-c role=authenticated' \
      pgbench "${PGB_ARGS[@]}" -M "$mode" -h 127.0.0.1 -p "$PP" -U authenticator bench
    # PgBouncer 1.18 cannot run -M prepared in transaction mode ("P_0
    # already exists"), and the statements its failed runs leave on its
    # server connections would follow it into the next rounds: not run.
    if [ "$mode" != prepared ]; then
      run_pgbench "pgbouncer-$mode-r$round" "$PGB_PID" PGPASSWORD="$PASSWORD" \
        pgbench "${PGB_ARGS[@]}" -M "$mode" -h 127.0.0.1 -p "$PGB_PORT" -U authenticator bench
    fi
    run_pgbench "cascata-$mode-r$round" "$CASCATA_PID" PGPASSWORD="$TOKEN" \
      pgbench "${PGB_ARGS[@]}" -M "$mode" -h 127.0.0.1 -p "$CASCATA_PORT" -U authenticated bench
    run_pgbench "cascata1-$mode-r$round" "$CASCATA1_PID" PGPASSWORD="$TOKEN" \
      pgbench "${PGB_ARGS[@]}" -M "$mode" -h 127.0.0.1 -p "$CASCATA1_PORT" -U authenticated bench
    run_pgbench "relay-$mode-r$round" "$RELAY_PID" PGPASSWORD="$PASSWORD" PGOPTIONS='-c role=authenticated' \
      pgbench "${PGB_ARGS[@]}" -M "$mode" -h 127.0.0.1 -p "$RELAY_PORT" -U authenticator bench
    # The prototypes pool like PgBouncer 1.18: named statements would land
    # on any server, so no -M prepared either.
    if [ "$mode" != prepared ]; then
      run_pgbench "poolg-$mode-r$round" "$POOLG_PID" \
        pgbench "${PGB_ARGS[@]}" -M "$mode" -h 127.0.0.1 -p "$POOLG_PORT" -U authenticator bench
      run_pgbench "poole-$mode-r$round" "$POOLE_PID" \
        pgbench "${PGB_ARGS[@]}" -M "$mode" -h 127.0.0.1 -p "$POOLE_PORT" -U authenticator bench
      run_pgbench "poolc-$mode-r$round" "$POOLC_PID" \
        pgbench "${PGB_ARGS[@]}" -M "$mode" -h 127.0.0.1 -p "$POOLC_PORT" -U authenticator bench
    fi
  done
done
for t in "${SEL_TARGETS[@]}"; do
  for mode in simple extended prepared; do
    median_row "$t-$mode"
  done
done
stop_pid "$RELAY_PID" 5
RELAY_PID=""
stop_protos
if [ -z "$BEFORE_BIN" ]; then
  stop_pid "$CASCATA1_PID" 15
  CASCATA1_PID=""
fi

# PgBouncer alone: a fresh process, one run per mode with nothing else of
# the bench's own at work, to check its numbers in the rounds against.
stop_pid "$PGB_PID" 10
start_pgbouncer
for mode in simple extended; do
  run_pgbench "pgbouncer-alone-$mode" "$PGB_PID" PGPASSWORD="$PASSWORD" \
    pgbench "${PGB_ARGS[@]}" -M "$mode" -h 127.0.0.1 -p "$PGB_PORT" -U authenticator bench
done

# Where the time goes: PgBouncer and cascata each alone and fresh, simple
# mode. A clean run gives user and kernel CPU per transaction (from
# /proc/PID/stat) and, for cascata, a CPU profile from its admin plane
# (pprof's samples at 100 Hz cost next to nothing); a second, shorter run
# under strace -c (which slows the proxy, so it gives counts only) gives
# the system calls per transaction.
WHERE=$LOGDIR/where.tsv
: >"$WHERE"
CLK_TCK=$(getconf CLK_TCK)
ticks_of() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12, $13}'; }
# where_time ID PID ENV... pgbench ARGS...
where_time() {
  local id=$1 pid=$2
  shift 2
  local u0 s0 u1 s1 txns calls="" out=$LOGDIR/where-$id.out
  echo "where-$id: $(redact "$*")" >>"$COMMANDS"
  say "run where-$id"
  read -r u0 s0 < <(ticks_of "$pid")
  timeout -k 5 $((SEL_DUR + 60)) env "$@" -T "$SEL_DUR" >"$out" 2>&1 || true
  read -r u1 s1 < <(ticks_of "$pid")
  txns=$(grep -m1 -oP '^number of transactions actually processed: \K[0-9]+' "$out" || echo 0)
  if command -v strace >/dev/null && [ "$txns" -gt 0 ]; then
    local st=$LOGDIR/where-$id.strace sp n2
    strace -c -f -p "$pid" -o "$st" 2>/dev/null &
    sp=$!
    sleep 0.5
    timeout -k 5 $((SEL_DUR + 60)) env "$@" -T $((SEL_DUR / 2 + 1)) >"$out.strace" 2>&1 || true
    kill -INT "$sp" 2>/dev/null || true
    wait "$sp" 2>/dev/null || true
    n2=$(grep -m1 -oP '^number of transactions actually processed: \K[0-9]+' "$out.strace" || echo 0)
    # reads, writes, poller calls, futex, all: per transaction
    calls=$(awk -v n="$n2" '$NF ~ /^(read|recvfrom|recvmsg)$/ {r += $4} $NF ~ /^(write|sendto|sendmsg)$/ {w += $4}
      $NF ~ /^epoll/ {e += $4} $NF == "futex" {f += $4} $NF == "total" {t = $4}
      END {if (n > 0) printf "%.2f\t%.2f\t%.2f\t%.2f\t%.2f", r / n, w / n, e / n, f / n, t / n}' "$st")
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$txns" \
    "$(awk -v d=$((u1 - u0)) -v n="$txns" -v hz="$CLK_TCK" 'BEGIN {if (n > 0) printf "%.1f", d * 1e6 / hz / n}')" \
    "$(awk -v d=$((s1 - s0)) -v n="$txns" -v hz="$CLK_TCK" 'BEGIN {if (n > 0) printf "%.1f", d * 1e6 / hz / n}')" \
    "$(grep -m1 -oP '^tps = \K[0-9.]+' "$out" || true)" "${calls:-}" >>"$WHERE"
}
where_time pgbouncer "$PGB_PID" PGPASSWORD="$PASSWORD" \
  pgbench -n -S -c "$CLIENTS" -j "$THREADS" -M simple -h 127.0.0.1 -p "$PGB_PORT" -U authenticator bench
stop_pid "$CASCATA_PID" 15
start_cascata
PROFILE=$LOGDIR/cascata-cpu.pb.gz
curl -fsS --max-time $((SEL_DUR + 30)) -H "Authorization: Bearer $BENCH_ADMIN_TOKEN" \
  "http://127.0.0.1:$ADMIN_PORT/debug/pprof/profile?seconds=$((SEL_DUR > 4 ? SEL_DUR - 2 : SEL_DUR))" -o "$PROFILE" 2>/dev/null &
PROF_PID=$!
where_time cascata "$CASCATA_PID" PGPASSWORD="$TOKEN" \
  pgbench -n -S -c "$CLIENTS" -j "$THREADS" -M simple -h 127.0.0.1 -p "$CASCATA_PORT" -U authenticated bench
wait "$PROF_PID" 2>/dev/null || true
PROFILE_TOP=$LOGDIR/cascata-cpu-top.txt
(cd "$ROOT" && go tool pprof -top -nodecount=5000 -nodefraction=0 -edgefraction=0 "$PROFILE") >"$PROFILE_TOP" 2>/dev/null || : >"$PROFILE_TOP"

# --- 4b. select-only with clients over TLS ---------------------------------------

# A BaaS's clients come over TLS (their password is a JWT). PgBouncer
# (client_tls_sslmode = require), cascata (tls_cert_file) and the two
# loop prototypes (-tls-cert: each handshake in a goroutine, then the
# socket enrolled in the loop) start fresh with one throwaway
# certificate (benchtool tlscert) and run in turn, simple and extended,
# as many rounds as above; their server connections stay plain. The
# cipher each one negotiates with libpq is recorded.
"$TOOL" tlscert -cert "$WORK/tls.crt" -key "$WORK/tls.key" || die "tlscert"
[ ${#AS_PG[@]} -gt 0 ] && chown postgres: "$WORK/tls.crt" "$WORK/tls.key"
CFGT=$WORK/cascata-tls.toml
mkdir -p "$WORK/statet"
sed -e "s#127.0.0.1:$CASCATA_PORT#127.0.0.1:$CASCATAT_PORT#; s#127.0.0.1:$ADMIN_PORT#127.0.0.1:$ADMINT_PORT#; s#$WORK/state\"#$WORK/statet\"#" \
  -e "/^listen = \"127.0.0.1:$CASCATAT_PORT\"/a tls_cert_file = \"$WORK/tls.crt\"\ntls_key_file = \"$WORK/tls.key\"" "$CFG" >"$CFGT"
"$BIN" serve -config "$CFGT" >"$LOGDIR/cascata-tls.log" 2>&1 &
CASCATAT_PID=$!
sed -e "s/^listen_port = .*/listen_port = $PGBT_PORT/; s#^logfile = .*#logfile = $WORK/pgb/pgbouncer-tls.log#" \
  -e "/^\[pgbouncer\]/a client_tls_sslmode = require\nclient_tls_cert_file = $WORK/tls.crt\nclient_tls_key_file = $WORK/tls.key" \
  "$WORK/pgb/pgbouncer.ini" >"$WORK/pgb/pgbouncer-tls.ini"
[ ${#AS_PG[@]} -gt 0 ] && chown postgres: "$WORK/pgb/pgbouncer-tls.ini"
"${AS_PG[@]}" "$PGBOUNCER" "$WORK/pgb/pgbouncer-tls.ini" >>"$LOGDIR/pgbouncer-tls.stderr" 2>&1 &
PGBT_PID=$!
start_proto eventloop "$POOLET_PORT" pool-eventloop-tls -tls-cert "$WORK/tls.crt" -tls-key "$WORK/tls.key"
POOLET_PID=$PROTO_PID
start_proto coro "$POOLCT_PORT" pool-coro-tls -tls-cert "$WORK/tls.crt" -tls-key "$WORK/tls.key"
POOLCT_PID=$PROTO_PID
wait_healthy "$ADMINT_PORT" "$CASCATAT_PID" "$LOGDIR/cascata-tls.log"
TLS_CIPHERS=$LOGDIR/tls-ciphers.txt
: >"$TLS_CIPHERS"
# tls_ready NAME PORT USER PASSWORD: waits until a TLS login works and
# records the protocol and cipher psql reports.
tls_ready() {
  local info
  for _ in $(seq 1 100); do
    if info=$(PGPASSWORD=$4 PGSSLMODE=require psql -X -h 127.0.0.1 -p "$2" -U "$3" -d bench -c '\conninfo' 2>/dev/null |
      grep -o 'SSL connection.*'); then
      echo "$1: $info" >>"$TLS_CIPHERS"
      return 0
    fi
    sleep 0.1
  done
  die "$1 did not answer over TLS within 10 s"
}
tls_ready PgBouncer "$PGBT_PORT" authenticator "$PASSWORD"
tls_ready cascata "$CASCATAT_PORT" authenticated "$TOKEN"
tls_ready pool-eventloop "$POOLET_PORT" authenticator ""
tls_ready pool-coro "$POOLCT_PORT" authenticator ""
for round in $(seq 1 "$ROUNDS"); do
  for mode in simple extended; do
    run_pgbench "pgbouncert-$mode-r$round" "$PGBT_PID" PGPASSWORD="$PASSWORD" PGSSLMODE=require \
      pgbench "${PGB_ARGS[@]}" -M "$mode" -h 127.0.0.1 -p "$PGBT_PORT" -U authenticator bench
    run_pgbench "cascatat-$mode-r$round" "$CASCATAT_PID" PGPASSWORD="$TOKEN" PGSSLMODE=require \
      pgbench "${PGB_ARGS[@]}" -M "$mode" -h 127.0.0.1 -p "$CASCATAT_PORT" -U authenticated bench
    run_pgbench "poolet-$mode-r$round" "$POOLET_PID" PGSSLMODE=require \
      pgbench "${PGB_ARGS[@]}" -M "$mode" -h 127.0.0.1 -p "$POOLET_PORT" -U authenticator bench
    run_pgbench "poolct-$mode-r$round" "$POOLCT_PID" PGSSLMODE=require \
      pgbench "${PGB_ARGS[@]}" -M "$mode" -h 127.0.0.1 -p "$POOLCT_PORT" -U authenticator bench
  done
done
for t in pgbouncert cascatat poolet poolct; do
  for mode in simple extended; do
    median_row "$t-$mode"
  done
done
stop_pid "$POOLET_PID" 10
stop_pid "$POOLCT_PID" 10
stop_pid "$CASCATAT_PID" 15
stop_pid "$PGBT_PID" 10
POOLET_PID="" POOLCT_PID="" CASCATAT_PID="" PGBT_PID=""

# --- 5. read-heavy mix (90 % reads, 10 % writes) --------------------------------

MIX_ARGS=(-n -c "$CLIENTS" -j "$THREADS" -T "$DUR" -M simple -D "scale=$SCALE"
  -f "$ROOT/bench/mix_read.sql@9" -f "$ROOT/bench/mix_write.sql@1")
for v in "bench:$TOKEN" "benchrep:$TOKEN_REP" "benchev:$TOKEN_EV" "benchpo:$TOKEN_PO"; do
  ref=${v%%:*}
  tok=${v#*:}
  route_snapshot "$LOGDIR/routes-$ref.before"
  run_pgbench "mix-$ref" "$CASCATA_PID" PGPASSWORD="$tok" \
    pgbench "${MIX_ARGS[@]}" -h 127.0.0.1 -p "$CASCATA_PORT" -U authenticated "$ref"
  route_snapshot "$LOGDIR/routes-$ref.after"
  route_delta "$LOGDIR/routes-$ref.before" "$LOGDIR/routes-$ref.after" "$ref" >"$LOGDIR/routes-$ref.delta"
done

# --- 6. connection rate and identity switching ----------------------------------

CONN_ARGS=(-n -C -c "$CLIENTS" -j "$THREADS" -T "$CONN_DUR" -M simple -f "$ROOT/bench/select1.sql")
run_pgbench conn-cascata-hs256 "$CASCATA_PID" PGPASSWORD="$TOKEN" \
  pgbench "${CONN_ARGS[@]}" -h 127.0.0.1 -p "$CASCATA_PORT" -U authenticated bench
run_pgbench conn-cascata-rs256 "$CASCATA_PID" PGPASSWORD="$TOKEN_RS" \
  pgbench "${CONN_ARGS[@]}" -h 127.0.0.1 -p "$CASCATA_PORT" -U authenticated benchrs
run_pgbench conn-pgbouncer-scram "$PGB_PID" PGPASSWORD="$PASSWORD" \
  pgbench "${CONN_ARGS[@]}" -h 127.0.0.1 -p "$PGB_PORT" -U authenticator bench
run_pgbench conn-direct-scram "" PGPASSWORD="$PASSWORD" PGOPTIONS='-c role=authenticated' \
  pgbench "${CONN_ARGS[@]}" -h 127.0.0.1 -p "$PP" -U authenticator bench

USER_TARGETS=("users:$CASCATA_PORT:$CASCATA_PID")
[ -n "$BEFORE_BIN" ] && USER_TARGETS+=("usersbefore:$CASCATA1_PORT:$CASCATA1_PID")
# Interleaved rounds, as for select-only: the machine's drift between two
# single runs is as large as the effect measured. Each target's figures are
# the medians over the rounds (errors: their total).
for round in $(seq 1 "$ROUNDS"); do
  for kind in distinct same; do
    for ut in "${USER_TARGETS[@]}"; do
      IFS=: read -r uid uport upid <<<"$ut"
      say "run $uid-$kind-r$round ($USERS connections)"
      flag=-distinct=false
      [ "$kind" = distinct ] && flag=-distinct=true
      [ "$round" = 1 ] && echo "$uid-$kind: benchtool load -addr 127.0.0.1:$uport -db bench -role authenticated -secret-env BENCH_JWT_SECRET -n $USERS -dur ${DUR}s $flag -pid <cascata> ($ROUNDS rounds)" >>"$COMMANDS"
      timeout -k 5 $((DUR + 300)) "$TOOL" load -addr "127.0.0.1:$uport" -db bench -role authenticated \
        -secret-env BENCH_JWT_SECRET -n "$USERS" -dur "${DUR}s" "$flag" -pid "$upid" \
        >"$LOGDIR/$uid-$kind-r$round.out" 2>"$LOGDIR/$uid-$kind-r$round.err" || say "$uid-$kind-r$round failed: $(tail -n3 "$LOGDIR/$uid-$kind-r$round.err")"
    done
  done
done
for ut in "${USER_TARGETS[@]}"; do
  uid=${ut%%:*}
  for kind in distinct same; do
    rounds=()
    for round in $(seq 1 "$ROUNDS"); do rounds+=("$LOGDIR/$uid-$kind-r$round.out"); done
    median_kv "${rounds[@]}" >"$LOGDIR/$uid-$kind.out"
  done
  per=""
  for round in $(seq 1 "$ROUNDS"); do
    per="$per $(ratio "$(kv "$LOGDIR/$uid-distinct-r$round.out" tps)" "$(kv "$LOGDIR/$uid-same-r$round.out" tps)")"
  done
  echo "ratio_per_round=${per# }" >>"$LOGDIR/$uid-distinct.out"
done

# Units that may leave session state are scrubbed on release (RESET ALL,
# CLOSE ALL, UNLISTEN *, ...): here a session advisory lock taken and
# released in one statement per transaction, on both builds when there is a
# before build.
SCRUB_ARGS=(-n -c "$CLIENTS" -j "$THREADS" -T "$DUR" -M simple -D "scale=$SCALE" -f "$ROOT/bench/scrubbed_unit.sql")
if [ -n "$BEFORE_BIN" ]; then
  for round in $(seq 1 "$ROUNDS"); do
    run_pgbench "scrub-after-r$round" "$CASCATA_PID" PGPASSWORD="$TOKEN" \
      pgbench "${SCRUB_ARGS[@]}" -h 127.0.0.1 -p "$CASCATA_PORT" -U authenticated bench
    run_pgbench "scrub-before-r$round" "$CASCATA1_PID" PGPASSWORD="$TOKEN" \
      pgbench "${SCRUB_ARGS[@]}" -h 127.0.0.1 -p "$CASCATA1_PORT" -U authenticated bench
  done
  median_row scrub-after
  median_row scrub-before
  stop_pid "$CASCATA1_PID" 15
  CASCATA1_PID=""
fi

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
CASCATA_STATE="running"
alive "$CASCATA_PID" || CASCATA_STATE="DEAD"
PANICS=$(grep -c -E '^panic|fatal error|goroutine [0-9]+ \[' "$LOGDIR/cascata.log" || true)
ERRLINES=$(grep -c 'level=ERROR' "$LOGDIR/cascata.log" || true)
CASCATA_RSS_END=$(rss_of "$CASCATA_PID" 2>/dev/null || echo "?")

# --- 7. RESULTS.md -----------------------------------------------------------------

fmt() { [ -n "$1" ] && printf '%s' "$1" || printf '—'; }
# num VALUE DECIMALS: a rounded number, or —.
num() { [ -n "$1" ] && awk -v v="$1" -v d="$2" 'BEGIN {printf "%.*f", d, v}' || printf '—'; }
row_sel() { # ID TARGET MODE
  local id=$1
  if [ -z "$(field "$id" 1)" ]; then
    printf '| %s | %s | not run ||||||||\n' "$2" "$3"
    return
  fi
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$2" "$3" "$(num "$(field "$id" 2)" 0)" "$(fmt "$(field "$id" 3)")" \
    "$(fmt "$(field "$id" 4)")" "$(field "$id" 5)/$(field "$id" 6)" "$(fmt "$(field "$id" 7)")" "$(fmt "$(field "$id" 8)")" \
    "$(spread "$(field "$id" 12)" "$(field "$id" 13)")" "$(fmt "$(field "$id" 11)")" "$(fmt "$(field "$id" 14)")"
}
# spread LO HI: HI/LO of the CPU per 1,000 transactions over the rounds.
spread() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "" || b == "" || a + 0 == 0) print "—"; else printf "%.2f", b / a}'; }
verdict() { # VALUE OP LIMIT
  awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {
    if (v == "n/a") { print "n/a"; exit }
    ok = (op == ">=") ? (v + 0 >= l + 0) : (v + 0 <= l + 0)
    print ok ? "met" : "**not met**" }'
}
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
ELAPSED=$(($(date +%s) - START_EPOCH))

{
  echo "# Cascata benchmark results"
  echo
  echo "Written by \`make bench\` (bench/run.sh); every run overwrites this file."
  echo
  echo "| | |"
  echo "|---|---|"
  echo "| date | $(date -u '+%Y-%m-%d %H:%M:%S UTC') |"
  echo "| machine | $(nproc) CPUs, $CPU_MODEL, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) RAM, Linux $(uname -r) |"
  echo "| load average (1/5/15 min) | at start $LOAD_START; at end $LOAD_END (other work on the machine makes absolute numbers noisy) |"
  echo "| PostgreSQL | $PG_VERSION (primary + streaming replica, loopback TCP, fsync off, shared_buffers 256MB) |"
  echo "| PgBouncer | $("$PGBOUNCER" --version 2>/dev/null | awk 'NR == 1') |"
  echo "| cascata | $COMMIT$DIRTY |"
  echo "| command | \`${CASCATA_BIN:+CASCATA_BIN=$CASCATA_BIN }BENCH_DURATION=$DUR BENCH_CONN_DURATION=$CONN_DUR BENCH_SELECT_DURATION=$SEL_DUR BENCH_ROUNDS=$ROUNDS BENCH_CLIENTS=$CLIENTS BENCH_THREADS=$THREADS BENCH_POOL_SIZE=$POOL BENCH_SCALE=$SCALE BENCH_IDLE_CLIENTS=$IDLE_CLIENTS BENCH_IDLE_SETTLE=$IDLE_SETTLE BENCH_USERS=$USERS make bench\` ($ELAPSED s) |"
  echo "| pool | cascata \`pool_mode = \"transaction\"\`, \`pool_size = $POOL\`; pgbouncer \`pool_mode = transaction\`, \`default_pool_size = $POOL\`, \`auth_type = scram-sha-256\` with the SCRAM verifier of authenticator in auth_file (SCRAM pass-through to the server), clients log in as authenticator, server connections run \`connect_query = 'SET ROLE authenticated'\` |"
  echo
  echo "Direct runs log in as \`authenticator\` with \`PGOPTIONS='-c role=authenticated'\`; pgbouncer runs as \`authenticator\`;"
  echo "cascata runs as \`authenticated\` with an HS256 JWT as the password (cascata applies \`SET ROLE\` and the claims)."
  echo "Proxy CPU = utime+stime of the proxy process (/proc/<pid>/stat) over the run; pgbouncer is single-threaded, cascata uses every core."
  echo
  echo "## Select-only: \`pgbench -n -S -c $CLIENTS -j $THREADS -T $SEL_DUR\`, $ROUNDS rounds (issue 2, issue 5)"
  echo
  echo "Each round runs every target and mode in turn; TPS, latency and CPU per 1,000 transactions are the medians"
  echo "over the rounds, transactions, failures and CPU seconds their totals. Both proxies start afresh after the"
  echo "idle-client measurement, so no target carries its leftovers; PgBouncer 1.18 does not run \`-M prepared\`"
  echo "(it cannot in transaction mode, and its failed runs would leave statements on its server connections)."
  echo
  echo "| target | -M | TPS | avg latency ms | transactions | failed txns/aborted clients | proxy CPU s | proxy CPU s per 1,000 txns | CPU per txn, highest/lowest round | load average (1 min) at the start of a run, median | Go heap allocations per txn (cascata) |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for mode in simple extended prepared; do
    row_sel "direct-$mode" "PostgreSQL direct" "$mode"
    row_sel "pgbouncer-$mode" "pgbouncer 1.18" "$mode"
    row_sel "cascata-$mode" "cascata" "$mode"
    row_sel "cascata1-$mode" "$SECOND_LABEL" "$mode"
    row_sel "relay-$mode" "Go byte relay (floor, no pooling)" "$mode"
    row_sel "poolg-$mode" "prototype: goroutine per client, pooling" "$mode"
    row_sel "poole-$mode" "prototype: gnet event loop, pooling" "$mode"
    row_sel "poolc-$mode" "prototype: coroutine per client on a gnet loop, pooling" "$mode"
  done
  echo
  echo "### cascata / pgbouncer"
  echo
  echo "| -M | proxy | TPS ratio (target ≥ 1) | CPU per txn ratio (target ≤ 1) | TPS | CPU/txn | TPS ratio per round | CPU ratio per round |"
  echo "|---|---|---:|---:|---|---|---|---|"
  for mode in simple extended prepared; do
    for v in "cascata:cascata" "cascata1:$SECOND_LABEL" "relay:Go byte relay (floor)" "poolg:prototype: goroutine per client" "poole:prototype: gnet event loop" "poolc:prototype: coroutine per client on a loop"; do
      id=${v%%:*}
      tr=$(ratio "$(field "$id-$mode" 2)" "$(field "pgbouncer-$mode" 2)")
      cr=$(ratio "$(field "$id-$mode" 8)" "$(field "pgbouncer-$mode" 8)")
      rounds="$(round_ratios "$id-$mode" "pgbouncer-$mode" 2) | $(round_ratios "$id-$mode" "pgbouncer-$mode" 8)"
      if [ -z "$(field "pgbouncer-$mode" 1)" ]; then
        echo "| $mode | ${v#*:} | — | — | PgBouncer 1.18 cannot run it in transaction mode: not run | | |"
      elif [ "$(field "pgbouncer-$mode" 6)" != 0 ] || [ "$(field "pgbouncer-$mode" 9)" != 0 ]; then
        echo "| $mode | ${v#*:} | $tr | $cr | pgbouncer failed: not comparable | | $rounds |"
      else
        echo "| $mode | ${v#*:} | $tr | $cr | $(verdict "$tr" '>=' 1) | $(verdict "$cr" '<=' 1) | $rounds |"
      fi
    done
  done
  echo
  echo "PgBouncer's own numbers, checked: after the rounds a fresh PgBouncer ran alone (one run per mode, the other"
  echo "proxies idle). Its CPU per 1,000 transactions there, and in the rounds (median):"
  echo
  echo "| -M | alone | in the rounds | rounds / alone | TPS alone | TPS in the rounds |"
  echo "|---|---:|---:|---:|---:|---:|"
  for mode in simple extended; do
    echo "| $mode | $(fmt "$(field "pgbouncer-alone-$mode" 8)") | $(fmt "$(field "pgbouncer-$mode" 8)") | $(ratio "$(field "pgbouncer-$mode" 8)" "$(field "pgbouncer-alone-$mode" 8)") | $(num "$(field "pgbouncer-alone-$mode" 2)" 0) | $(num "$(field "pgbouncer-$mode" 2)" 0) |"
  done
  echo
  echo "### Where the time goes: each proxy alone, \`-M simple\`"
  echo
  echo "A fresh PgBouncer, then a fresh cascata, nothing else of the bench's own at work: CPU per transaction"
  echo "split into user and kernel time (/proc), and the system calls per transaction counted in a second run"
  echo "under \`strace -c -f\` (which slows the proxy: counts only)."
  echo
  echo "| proxy | TPS | user µs per txn | kernel µs per txn | reads per txn | writes per txn | epoll calls per txn | futex per txn | all system calls per txn |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  awk -F'\t' '{printf "| %s | %.0f | %s | %s | %s | %s | %s | %s | %s |\n", $1, $5, $3, $4, ($6 == "" ? "—" : $6), ($7 == "" ? "—" : $7), ($8 == "" ? "—" : $8), ($9 == "" ? "—" : $9), ($10 == "" ? "—" : $10)}' "$WHERE"
  echo
  if [ -s "$PROFILE_TOP" ]; then
    echo "cascata's CPU profile over that run (\`go tool pprof -top\`), samples by where they were taken (flat):"
    echo
    echo "| share of samples | where |"
    echo "|---:|---|"
    awk '$2 ~ /%$/ && NF >= 6 {
        f = $2; sub(/%/, "", f); name = $6
        if (name ~ /syscall\.|internal\/runtime\/syscall|^syscall/) k = "system calls (their kernel work included)"
        else if (name ~ /^runtime\.|^time\.|^internal\/runtime|^internal\/poll|^net\.|^sync\.|^internal\/sync/) k = "Go runtime: scheduler, network poller, locks, memory"
        else if (name ~ /^cascata\//) k = "cascata'"'"'s own code"
        else k = "libraries (pgproto3, puddle, prometheus, bufio, ...)"
        sum[k] += f
      }
      END {for (k in sum) printf "| %.1f %% | %s |\n", sum[k], k}' "$PROFILE_TOP" | sort -t'|' -k2 -rn
    echo
    echo "Its top functions by flat samples:"
    echo
    echo '```'
    awk '$2 ~ /%$/ && NF >= 6 && ++n <= 12' "$PROFILE_TOP"
    echo '```'
    echo
  fi
  echo "The byte relay does no protocol work and gives each client its own server connection; it reads and"
  echo "writes its sockets as cascata does (internal/sockio), with two goroutines per client. The pooling"
  echo "prototypes below, which share 20 server connections and hand no bytes between goroutines, cost less."
  echo
  echo "### The I/O-model prototypes (not cascata)"
  echo
  echo "Three minimal transaction-pooling relays, \`benchtool pool-goroutine\`, \`benchtool pool-eventloop\` and \`benchtool pool-coro\`"
  echo "(bench/benchtool), each a prototype of one way to move a transaction, doing the same minimal work so"
  echo "they compare with PgBouncer: $POOL server connections logged in at start (SCRAM, then \`SET ROLE authenticated\`,"
  echo "as PgBouncer's connect_query); a client's StartupMessage answered by the relay itself with the server's"
  echo "ParameterStatus messages; a client that sends takes a free server (FIFO when none is free), and the server"
  echo "goes back to the pool at ReadyForQuery 'I' once every Query/Sync is answered. They read the message"
  echo "framing (type and length) and nothing else. They do **not** authenticate clients (any user, no password),"
  echo "parse SQL, route, set claims, scrub session state, forward CancelRequest or keep named prepared statements"
  echo "apart (like PgBouncer 1.18, hence no \`-M prepared\` runs): they are measurements, not proxies."
  echo
  echo "- goroutine per client: one goroutine per client connection, which while attached writes the query to"
  echo "  its server and reads the reply itself (no second goroutine, no hand-off); idle, it waits for its socket"
  echo "  to become readable without a buffer (internal/sockio) and takes a 16 KiB read buffer from a pool only"
  echo "  while data is in flight. A client that leaves during a statement is noticed within 100 ms (a read"
  echo "  deadline on the server lapses and the client socket is looked at): its statement is cancelled and"
  echo "  the server closed and replaced, as PgBouncer does (an open transaction with nothing running is rolled back)."
  echo "- gnet event loop: github.com/panjf2000/gnet/v2, one event loop (one goroutine, like PgBouncer's one"
  echo "  thread) holding every client and server connection (server sockets enrolled in the same loop after the"
  echo "  pgconn login), no goroutine per connection; callbacks write a client's bytes to its server and back"
  echo "  from the loop's read buffer; a client waiting for a server leaves its bytes in gnet's buffer."
  echo "- coroutine per client on a loop: the same gnet loop, but each client connection's life is one sequential"
  echo "  function, as in the goroutine design (startup, wait for the client, take a server, write, read the"
  echo "  replies, cancel or drain what a departing client left), run as a coroutine (\`iter.Pull\`): where it"
  echo "  would block it yields, and the loop resumes it when its client's socket or the server it holds has"
  echo "  something, or a server is handed to it. A resume is a direct switch on the loop's thread, no scheduler."
  echo
  echo "### Clients over TLS"
  echo
  echo "The same select-only rounds with every client over TLS (\`PGSSLMODE=require\`), against fresh processes"
  echo "serving one throwaway certificate: PgBouncer with \`client_tls_sslmode = require\`, cascata with"
  echo "\`tls_cert_file\`, and the two loop prototypes with \`-tls-cert\` (each handshake in a goroutine on the"
  echo "plain socket, then the socket enrolled in the loop, which reads and writes the records itself through"
  echo "crypto/tls). Server connections are plain. Protocol and cipher each negotiated with libpq:"
  echo
  sed 's/^/- /' "$TLS_CIPHERS"
  echo
  echo "| target | -M | TPS | of PgBouncer's | proxy CPU µs per txn | of PgBouncer's | CPU ratio per round |"
  echo "|---|---|---:|---:|---:|---:|---|"
  for mode in simple extended; do
    for t in "pgbouncert:PgBouncer" "cascatat:cascata" "poolet:gnet event loop (prototype)" "poolct:coroutine per client on the loop (prototype)"; do
      id=${t%%:*}
      tps=$(field "$id-$mode" 2)
      per=$(field "$id-$mode" 8)
      rounds=—
      [ "$id" != pgbouncert ] && rounds=$(round_ratios "$id-$mode" "pgbouncert-$mode" 8)
      echo "| ${t#*:} | $mode | $(num "$tps" 0) | $(ratio "$tps" "$(field "pgbouncert-$mode" 2)") | $(num "$(awk -v p="$per" 'BEGIN {if (p != "") print p * 1000}')" 1) | $(ratio "$per" "$(field "pgbouncert-$mode" 8)") | $rounds |"
    done
  done
  echo
  echo "Failures (non-zero exit or aborted clients):"
  echo
  awk -F'\t' '$10 != "" {n++; printf "- `%s`: %s\n", $1, $10} END {if (!n) print "- none"}' "$RESULTS"
  echo
  echo "## Memory: $(kv "$IDLE_C" clients) idle clients, $IDLE_STMTS named prepared statements each (issue 5)"
  echo
  echo "Each client connects, then prepares the same 10 statements (ORM-like); VmRSS of the proxy is read"
  echo "before, after connecting and after preparing ($IDLE_SETTLE settle each, the same for every proxy: long enough"
  echo "for cascata's idle sweep to park idle sessions and drop spare buffers); every 50th client then executes its \`s0\`."
  echo
  echo "| proxy | clients | connect s | prepare s | RSS before MiB | RSS connected MiB | RSS prepared MiB | RSS per client | RSS per client incl. statements | Go heap+stack in use per client incl. statements (allocated, not all touched) | exec checks failed |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for p in cascata pgbouncer pool-goroutine pool-eventloop pool-coro; do
    f=$LOGDIR/idle-$p.out
    if [ -s "$f" ] && [ -n "$(kv "$f" rss_before_kb)" ]; then
      mib() { awk -v k="$1" 'BEGIN {if (k == "") print "—"; else printf "%.1f", k / 1024}'; }
      kib() { awk -v b="$1" 'BEGIN {if (b == "") print "—"; else printf "%.1f KiB", b / 1024}'; }
      st=$(kv "$f" stmts)
      echo "| $p | $(kv "$f" clients) (failed $(kv "$f" connect_failures)) | $(kv "$f" connect_secs) | $([ "$st" = 0 ] && echo "— (none)" || kv "$f" prepare_secs) | $(mib "$(kv "$f" rss_before_kb)") | $(mib "$(kv "$f" rss_connected_kb)") | $(mib "$(kv "$f" rss_prepared_kb)") | $(kib "$(kv "$f" rss_per_client_bytes)") | $([ "$st" = 0 ] && echo — || kib "$(kv "$f" rss_per_client_with_stmts_bytes)") | $(kib "$(kv "$f" go_inuse_per_client_with_stmts_bytes)") | $(kv "$f" exec_check_failures)/$(kv "$f" exec_checks) |"
      for e in connect_first_error prepare_first_error check_first_error; do
        [ -n "$(kv "$f" $e)" ] && echo "| $p $e: $(kv "$f" $e | sed 's/|/\\|/g') |||||||||||"
      done
    else
      echo "| $p | failed: $(tail -n1 "$LOGDIR/idle-$p.err" 2>/dev/null | sed 's/|/\\|/g') |||||||||||"
    fi
  done
  echo
  echo "The prototypes (pool-goroutine, pool-eventloop, pool-coro: no statements, no authentication) ran with $PROTO_IDLE idle"
  echo "clients each, against the target of at most 8 KiB RSS per idle client at 10,000."
  echo
  echo "## Read-heavy mix through cascata: 90 % \`SELECT abalance … WHERE aid = :aid\`, 10 % \`UPDATE … SET abalance = abalance + 1\` (issue 4)"
  echo
  echo "\`pgbench -n -c $CLIENTS -j $THREADS -T $DUR -M simple -f bench/mix_read.sql@9 -f bench/mix_write.sql@1\`; routing decisions from \`cascata_route_decisions_total\` (admin /metrics) over the run."
  echo "With a replica the project has pool_size backends on each host."
  echo
  echo "| project config | TPS | avg latency ms | aborted clients | reads | reads served by the replica | routing decisions (target reason count) | proxy CPU s per 1,000 txns |"
  echo "|---|---:|---:|---:|---:|---:|---|---:|"
  for v in "bench:no replica" "benchrep:1 replica, consistency = read_your_writes (default)" "benchev:1 replica, consistency = eventual" "benchpo:1 replica, consistency = primary_only"; do
    ref=${v%%:*}
    reads=$(awk '/^SQL script 1:/ {f = 1} f && / transactions \(/ {print $2; exit}' "$LOGDIR/mix-$ref.out" 2>/dev/null)
    rep=$(awk '$1 == "replica" {s += $3} END {print s + 0}' "$LOGDIR/routes-$ref.delta" 2>/dev/null || echo 0)
    share=$(awk -v r="$rep" -v n="$reads" 'BEGIN {if (n + 0 == 0) print "—"; else printf "%.1f %%", 100 * r / n}')
    dec=$(sort -k3,3nr "$LOGDIR/routes-$ref.delta" 2>/dev/null | awk 'NR <= 6 {printf "%s%s %s %s", (NR > 1 ? "; " : ""), $1, $2, $3}')
    echo "| $ref (${v#*:}) | $(num "$(field "mix-$ref" 2)" 0) | $(fmt "$(field "mix-$ref" 3)") | $(fmt "$(field "mix-$ref" 6)") | $(fmt "$reads") | $share | $(fmt "$dec") | $(fmt "$(field "mix-$ref" 8)") |"
  done
  echo
  echo "## Connection rate: \`pgbench -n -C -c $CLIENTS -j $THREADS -T $CONN_DUR -M simple -f bench/select1.sql\` (issue 3)"
  echo
  echo "Every transaction is a new connection: connect + authentication (JWT verification for cascata) + \`SELECT 1\`."
  echo
  echo "| target | connections/s | avg connection time ms | avg latency ms | failed/aborted | proxy CPU s per 1,000 connections |"
  echo "|---|---:|---:|---:|---:|---:|"
  for v in "conn-cascata-hs256:cascata, HS256 JWT" "conn-cascata-rs256:cascata, RS256 JWT (2048-bit, JWKS file)" "conn-pgbouncer-scram:pgbouncer, SCRAM" "conn-direct-scram:PostgreSQL direct, SCRAM"; do
    id=${v%%:*}
    ct=$(grep -m1 -oP '^average connection time = \K[0-9.]+' "$LOGDIR/$id.out" 2>/dev/null || true)
    echo "| ${v#*:} | $(num "$(field "$id" 2)" 0) | $(fmt "$ct") | $(fmt "$(field "$id" 3)") | $(field "$id" 5)/$(field "$id" 6) | $(fmt "$(field "$id" 8)") |"
  done
  echo
  echo "## Identity switching: $USERS connections through cascata, \`SELECT 1\` in a loop for $DUR s (issue 3)"
  echo
  echo "bench/benchtool load (pgconn, simple protocol): $USERS connections, each with its own JWT (distinct \`sub\`), vs $USERS connections sharing one JWT;"
  echo "$ROUNDS interleaved rounds, medians (errors: total)."
  echo
  echo "| tokens | connect s ($USERS logins) | logins/s | TPS | avg latency ms | errors | proxy CPU s per 1,000 txns |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for kind in distinct same $([ -n "$BEFORE_BIN" ] && echo before-distinct before-same); do
    f=$LOGDIR/users-$kind.out
    [ "${kind#before-}" != "$kind" ] && f=$LOGDIR/usersbefore-${kind#before-}.out
    echo "| $kind | $(fmt "$(kv "$f" connect_secs)") | $(fmt "$(kv "$f" connects_per_sec)") | $(fmt "$(kv "$f" tps)") | $(fmt "$(kv "$f" latency_ms)") | $(fmt "$(kv "$f" errors)")$([ -n "$(kv "$f" first_error)" ] && echo " ($(kv "$f" first_error))") | $(fmt "$(kv "$f" proxy_cpu_per_1k)") |"
  done
  echo
  echo "TPS distinct/same = $(ratio "$(kv "$LOGDIR/users-distinct.out" tps)" "$(kv "$LOGDIR/users-same.out" tps)") (per round: $(kv "$LOGDIR/users-distinct.out" ratio_per_round)); CPU per txn distinct/same = $(ratio "$(kv "$LOGDIR/users-distinct.out" proxy_cpu_per_1k)" "$(kv "$LOGDIR/users-same.out" proxy_cpu_per_1k)")."
  if [ -n "$BEFORE_BIN" ]; then
    echo
    echo "Before the change: TPS distinct/same = $(ratio "$(kv "$LOGDIR/usersbefore-distinct.out" tps)" "$(kv "$LOGDIR/usersbefore-same.out" tps)"); distinct TPS after/before = $(ratio "$(kv "$LOGDIR/users-distinct.out" tps)" "$(kv "$LOGDIR/usersbefore-distinct.out" tps)"), CPU per txn after/before = $(ratio "$(kv "$LOGDIR/users-distinct.out" proxy_cpu_per_1k)" "$(kv "$LOGDIR/usersbefore-distinct.out" proxy_cpu_per_1k)")."
    echo
    echo "## Units that are scrubbed at release: \`SELECT pg_try_advisory_lock(k), pg_advisory_unlock(k)\` per transaction, $ROUNDS rounds of $DUR s"
    echo
    echo "| build | TPS | avg latency ms | transactions | failed txns/aborted clients | proxy CPU s | proxy CPU s per 1,000 txns |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for v in "scrub-after:this build (scrubs)" "scrub-before:before the change"; do
      id=${v%%:*}
      echo "| ${v#*:} | $(num "$(field "$id" 2)" 0) | $(fmt "$(field "$id" 3)") | $(fmt "$(field "$id" 4)") | $(field "$id" 5)/$(field "$id" 6) | $(fmt "$(field "$id" 7)") | $(fmt "$(field "$id" 8)") |"
    done
    echo
    echo "TPS after/before = $(ratio "$(field scrub-after 2)" "$(field scrub-before 2)"); proxy CPU per txn after/before = $(ratio "$(field scrub-after 8)" "$(field scrub-before 8)")."
  fi
  echo
  echo "## Proxy health"
  echo
  while read -r line; do echo "- $line"; done <"$PROBLEMS"
  echo "- cascata at the end: $CASCATA_STATE, RSS $CASCATA_RSS_END KiB; panics in its log: $PANICS; level=ERROR lines: $ERRLINES"
  echo
  echo "## Exact commands"
  echo
  echo '```'
  sed "s#$ROOT/##g" "$COMMANDS" # paths relative to the repository
  echo '```'
  echo
  cat "$ROOT/bench/JOBS.md"
  if [ -n "$SCALE_SECTION" ]; then
    echo
    printf '%s\n' "$SCALE_SECTION"
  fi
} >"$OUT"

cat "$OUT"
