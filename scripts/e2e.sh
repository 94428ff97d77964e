#!/usr/bin/env bash
# End-to-end test of the built binary with real PostgreSQL clients: starts
# `cascata demo` (a throw-away primary + replica) on free ports in a temp
# dir, drives the proxy with psql and pgbench, stops it with SIGTERM and
# checks that its postgres servers are gone. Prints `e2e: N passed, M failed`
# last and exits non-zero on any failure.
#
# Environment: CASCATA_BIN (default bin/cascata), CASCATA_CONFIG (default
# cascata.toml), E2E_PGBENCH_SECONDS (default 5), E2E_KEEP=1 keeps the temp dir.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${CASCATA_BIN:-$ROOT/bin/cascata}
CONFIG=${CASCATA_CONFIG:-$ROOT/cascata.toml}
BENCH_SECONDS=${E2E_PGBENCH_SECONDS:-5}

# Only the variables set below may steer libpq.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^PG' || true)
export PGCONNECT_TIMEOUT=10 PGAPPNAME=cascata-e2e

PASSED=0
FAILED=0
WORK=""
DEMO_PID=""

say() { printf 'e2e: %s\n' "$*"; }
summary() { printf 'e2e: %d passed, %d failed\n' "$PASSED" "$FAILED"; }

DEMO_STOP_SECONDS=60
# shellcheck source=scripts/demo-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/demo-lib.sh"

cleanup() {
  local rc=$?
  trap - EXIT
  stop_demo
  remove_work "${E2E_KEEP:-0}"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail_setup() {
  say "setup failed: $*"
  FAILED=$((FAILED + 1))
  summary
  exit 1
}

# run_test NAME FUNCTION: a test function returns non-zero and prints why on failure.
run_test() {
  local name=$1 fn=$2 log rc=0 start ms
  log="$WORK/test.log"
  start=$(date +%s%N)
  "$fn" >"$log" 2>&1 || rc=$?
  ms=$((($(date +%s%N) - start) / 1000000))
  if [ "$rc" -eq 0 ]; then
    PASSED=$((PASSED + 1))
    printf 'e2e: ok   %-52s %3d.%ds\n' "$name" $((ms / 1000)) $((ms % 1000 / 100))
    sed -n 's/^note: /    /p' "$log"
  else
    FAILED=$((FAILED + 1))
    printf 'e2e: FAIL %-52s %3d.%ds\n' "$name" $((ms / 1000)) $((ms % 1000 / 100))
    sed 's/^/    | /' "$log"
  fi
}

# expect_eq WHAT WANT GOT
expect_eq() {
  if [ "$2" != "$3" ]; then
    printf '%s: want %q, got %q\n' "$1" "$2" "$3"
    return 1
  fi
}

[ -x "$BIN" ] || { echo "e2e: $BIN is missing: run make build" >&2; exit 1; }
for prog in psql pgbench; do
  command -v "$prog" >/dev/null || { echo "e2e: $prog is missing (apt-get install -y postgresql-client)" >&2; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cascata-e2e.XXXXXX")
chmod 755 "$WORK" # the postgres OS user must reach the cluster when run as root

# --- start the demo -----------------------------------------------------------
T0=$(date +%s)
env -u DEMO_JWT_SECRET -u CASCATA_ADMIN_TOKEN "$BIN" demo -config "$CONFIG" -dir "$WORK/demo" \
  -listen 127.0.0.1:0 -admin-listen 127.0.0.1:0 >"$WORK/demo.out" 2>"$WORK/demo.err" &
DEMO_PID=$!
for _ in $(seq 1 900); do
  grep -q '^Cascata demo is ready' "$WORK/demo.out" 2>/dev/null && break
  kill -0 "$DEMO_PID" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q '^Cascata demo is ready' "$WORK/demo.out"; then
  tail -n 30 "$WORK/demo.err" | sed 's/^/    | /'
  fail_setup "cascata demo did not become ready"
fi
PROXY=$(sed -n 's/^Cascata demo is ready: proxy \([^,]*\),.*/\1/p' "$WORK/demo.out")
PROXY_HOST=${PROXY%:*}
PROXY_PORT=${PROXY##*:}
PRIMARY_PORT=$(grep -o '"primary_port": *[0-9]*' "$WORK/demo/pg/cluster.json" | grep -o '[0-9]*$')
REPLICA_PORT=$(grep -o '"replica_port": *[0-9]*' "$WORK/demo/pg/cluster.json" | grep -o '[0-9]*$')
say "demo ready in $(($(date +%s) - T0))s: proxy $PROXY, primary :$PRIMARY_PORT, replica :$REPLICA_PORT"

export DEMO_JWT_SECRET
DEMO_JWT_SECRET=$(cat "$WORK/demo/jwt_secret")
ALICE=11111111-1111-4111-8111-111111111111
BOB=22222222-2222-4222-8222-222222222222
mint() { # mint ROLE [SUB]
  if [ $# -gt 1 ]; then
    "$BIN" token -config "$CONFIG" -project demo -role "$1" -sub "$2" -ttl 10m
  else
    "$BIN" token -config "$CONFIG" -project demo -role "$1" -ttl 10m
  fi
}
TOK_ANON=$(mint anon) || fail_setup "cascata token -role anon"
TOK_ALICE=$(mint authenticated "$ALICE") || fail_setup "cascata token -role authenticated"
TOK_BOB=$(mint authenticated "$BOB") || fail_setup "cascata token -role authenticated"

# through TOKEN [psql args...]: psql as the token's role, through the proxy.
through() {
  local role=$1 tok=$2
  shift 2
  PGHOST=$PROXY_HOST PGPORT=$PROXY_PORT PGDATABASE=demo PGUSER=$role PGPASSWORD=$tok \
    timeout 30 psql -X -q -At -v ON_ERROR_STOP=1 "$@"
}
# wait_replica waits (30 s at most) until the replica has replayed the primary's WAL.
wait_replica() {
  local lsn i
  lsn=$(direct "$PRIMARY_PORT" -c "select pg_current_wal_lsn()") || return 1
  for i in $(seq 1 300); do
    [ "$(direct "$REPLICA_PORT" -c "select pg_last_wal_replay_lsn() >= '$lsn'::pg_lsn" 2>/dev/null || true)" = t ] && return 0
    sleep 0.1
  done
  echo "replica has not replayed $lsn after 30s"
  return 1
}
# direct PORT [psql args...]: psql as superuser straight to a server of the cluster.
direct() {
  local port=$1
  shift
  PGHOST=127.0.0.1 PGPORT=$port PGDATABASE=demo PGUSER=postgres \
    timeout 60 psql -X -q -At -v ON_ERROR_STOP=1 "$@"
}

# --- tests --------------------------------------------------------------------
t_anon_current_user() {
  local out
  out=$(through anon "$TOK_ANON" -c 'select current_user') || return 1
  expect_eq "current_user" anon "$out"
}

t_authenticated_current_user() {
  local out
  out=$(through authenticated "$TOK_ALICE" -c "select current_user || ' ' || (current_setting('request.jwt.claims')::jsonb->>'sub')") || return 1
  expect_eq "current_user sub" "authenticated $ALICE" "$out"
}

t_printed_psql_url() {
  local url out
  url=$(grep -o "psql 'postgres://anon:[^']*'" "$WORK/demo.out" | head -n1 | sed "s/^psql '//; s/'\$//")
  [ -n "$url" ] || { echo "no anon psql URL in the demo output"; return 1; }
  out=$(timeout 30 psql -X -At "$url" -c 'select count(*) > 0 from announcements') || return 1
  expect_eq "anon reads announcements with the printed URL" t "$out"
}

t_role_ref_user_name() {
  local out
  out=$(PGHOST=$PROXY_HOST PGPORT=$PROXY_PORT PGDATABASE=postgres PGUSER=authenticated.demo PGPASSWORD=$TOK_ALICE \
    timeout 30 psql -X -At -c 'select current_user') || return 1
  expect_eq "current_user (user authenticated.demo, database postgres)" authenticated "$out"
}

t_multi_statement() {
  local out
  out=$(through authenticated "$TOK_ALICE" -c "insert into todos (title) values ('e2e-multi-1'); insert into todos (title) values ('e2e-multi-2'); select count(*) from todos where title like 'e2e-multi-%'") || return 1
  expect_eq "last result of a multi-statement query" 2 "$(printf '%s\n' "$out" | tail -n1)" || return 1
  out=$(through authenticated "$TOK_ALICE" -c "begin; update todos set done = true where title = 'e2e-multi-1'; select count(*) from todos where done; commit") || return 1
  expect_eq "explicit transaction in one query string" 1 "$(printf '%s\n' "$out" | tail -n1)"
}

t_rls_isolation() {
  local out
  out=$(through authenticated "$TOK_BOB" -c "select count(*) from todos") || return 1
  expect_eq "bob's view of alice's todos" 0 "$out"
}

# COPY FROM is refused by PostgreSQL on tables with RLS (todos), so \copy
# goes through a plain table created on the primary and granted to authenticated.
t_copy_in_out() {
  local in="$WORK/copy_in.csv" out="$WORK/copy_out.csv" n
  direct "$PRIMARY_PORT" -c "create table e2e_copy (n int primary key, title text, done bool); grant select, insert on e2e_copy to authenticated" || return 1
  wait_replica || return 1
  for n in $(seq 1 500); do printf '%d,copy row %d,%s\n' "$n" "$n" "$([ $((n % 2)) -eq 0 ] && echo t || echo f)"; done >"$in"
  through authenticated "$TOK_BOB" -c "\\copy e2e_copy from '$in' with (format csv)" || return 1
  through authenticated "$TOK_BOB" -c "\\copy (select n, title, done from e2e_copy order by n) to '$out' with (format csv)" || return 1
  if ! cmp -s "$in" "$out"; then
    echo "\\copy out differs from \\copy in:"
    diff "$in" "$out" | head -n 10
    return 1
  fi
  # COPY TO of an RLS table: only the user's own rows.
  n=$(through authenticated "$TOK_BOB" -c "\\copy todos to stdout" | wc -l) || return 1
  expect_eq "rows of todos bob copies out" 0 "$n"
}

t_error_then_ok() {
  local out rc=0
  out=$(printf '%s\n' \
    "select 1/0;" \
    "select 'after-error';" \
    "set role service_role;" \
    "select current_user;" \
    "begin;" \
    "select * from no_such_table;" \
    "select 'in-aborted-txn';" \
    "rollback;" \
    "select 'after-rollback';" |
    through authenticated "$TOK_ALICE" -v ON_ERROR_STOP=0 2>&1) || rc=$?
  printf '%s\n' "$out"
  expect_eq "psql exit status" 0 "$rc" || return 1
  local want
  for want in "division by zero" "after-error" "authenticated" "no_such_table" "current transaction is aborted" "after-rollback"; do
    printf '%s\n' "$out" | grep -q -- "$want" || { echo "missing in output: $want"; return 1; }
  done
  if printf '%s\n' "$out" | grep -qx 'service_role'; then
    echo "SET ROLE service_role was not refused"
    return 1
  fi
}

# pgbench -i needs owner rights: initialise on the primary, grant to authenticated.
t_pgbench_init() {
  PGHOST=127.0.0.1 PGPORT=$PRIMARY_PORT PGUSER=postgres timeout 60 pgbench -i -q -s 1 demo || return 1
  direct "$PRIMARY_PORT" -c "grant select, insert, update on pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history to authenticated" || return 1
  # The read-only runs may be routed to the replica.
  wait_replica
}

pgbench_through() { # pgbench_through MODE
  local out
  out=$(PGHOST=$PROXY_HOST PGPORT=$PROXY_PORT PGUSER=authenticated PGPASSWORD=$TOK_ALICE \
    timeout $((BENCH_SECONDS + 30)) pgbench -n -S -M "$1" -c 8 -j 2 -T "$BENCH_SECONDS" demo 2>&1) || { printf '%s\n' "$out"; return 1; }
  printf '%s\n' "$out"
  local failed tps
  failed=$(printf '%s\n' "$out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p')
  tps=$(printf '%s\n' "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | tail -n1)
  [ -n "$failed" ] || failed=$(printf '%s\n' "$out" | grep -c 'aborted\|error' || true)
  expect_eq "failed transactions" 0 "$failed" || return 1
  awk -v t="$tps" 'BEGIN { exit !(t + 0 > 0) }' || { echo "tps not > 0: '$tps'"; return 1; }
  echo "note: tps $tps, $failed failed"
}
t_pgbench_simple() { pgbench_through simple; }
t_pgbench_extended() { pgbench_through extended; }

postmaster_gone_now() {
  local cmd
  cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" || true)
  case "$cmd" in *"$WORK/demo/pg"*) return 1 ;; *) return 0 ;; esac
}
# postmaster_gone PID: waits (10 s at most) until PID no longer runs a postgres
# of the work dir: gone, a zombie, or reused by another program.
postmaster_gone() {
  local i
  for i in $(seq 1 100); do
    postmaster_gone_now "$1" && return 0
    sleep 0.1
  done
  return 1
}

t_sigterm_stops_everything() {
  local pids="" f pid
  for f in "$WORK"/demo/pg/primary/postmaster.pid "$WORK"/demo/pg/replica/postmaster.pid; do
    [ -f "$f" ] || { echo "$f missing while the demo runs"; return 1; }
    pid=$(head -n1 "$f")
    if postmaster_gone_now "$pid"; then echo "postmaster $pid not seen while the demo runs"; return 1; fi
    pids="$pids $pid"
  done
  stop_demo
  for pid in $pids; do
    postmaster_gone "$pid" || { echo "postmaster $pid still runs 10s after the demo stopped"; return 1; }
  done
  for f in "$WORK"/demo/pg/primary/postmaster.pid "$WORK"/demo/pg/replica/postmaster.pid; do
    [ ! -f "$f" ] || { echo "$f left behind"; return 1; }
  done
  if (exec 3<>"/dev/tcp/$PROXY_HOST/$PROXY_PORT") 2>/dev/null; then
    echo "proxy still accepts connections on $PROXY"
    return 1
  fi
  [ -f "$WORK/demo/pg/primary/PG_VERSION" ] || { echo "cluster data was not kept"; return 1; }
  sed -n 's/^time=[^ ]* level=INFO msg=/note: /p' "$WORK/demo.err" | tail -n 3
}

run_test "psql: select current_user as anon" t_anon_current_user
run_test "psql: select current_user as authenticated" t_authenticated_current_user
run_test "psql: the printed anon URL works" t_printed_psql_url
run_test "psql: user name role.ref" t_role_ref_user_name
run_test "psql: multi-statement query strings" t_multi_statement
run_test "psql: RLS hides other users' rows" t_rls_isolation
run_test "psql: \\copy in and out" t_copy_in_out
run_test "psql: errors, then working statements" t_error_then_ok
run_test "pgbench -i on the primary + grants" t_pgbench_init
run_test "pgbench -S -M simple -c 8 -j 2 through the proxy" t_pgbench_simple
run_test "pgbench -S -M extended -c 8 -j 2 through the proxy" t_pgbench_extended
run_test "SIGTERM stops the proxy and postgres" t_sigterm_stops_everything

say "total $(($(date +%s) - T0))s"
summary
[ "$FAILED" -eq 0 ]
