#!/usr/bin/env bash
# The client matrix: real drivers and ORMs through cascata in transaction
# mode, each logged in as role `authenticated` with a JWT.
#
# Starts `cascata demo` (a throw-away primary + streaming replica and the
# proxy) on free loopback ports in a temp dir, creates one table per client
# as superuser (granted to authenticated) and myschema.compat_marker, then
# runs every client. Each client runs the same checks where it has the
# feature: connect, crud, rollback, prepared (prepared statements reused
# across transactions; between rounds other connections begin transactions
# until they hold the backend the client last ran on, so the proxy must
# prepare the statements on another one), error_then_ok, search_path (SET,
# then the next transaction, on another backend, relies on it), copy,
# cancel (of pg_sleep(5): 57014 quickly, the connection usable after).
# Last, DEALLOCATE ALL (psql and pgx) followed by the same search_path
# round trip.
#
# Prints `compat: <client> ok|FAIL <reason>` per client and last
# `compat: N passed, M failed`; exits non-zero if any failed.
#
# Installs what is missing (as root): python3-psycopg2 python3-asyncpg
# libpostgresql-jdbc-java default-jre-headless (apt), the node packages
# (`npm ci` in scripts/compat/node), and generates the Prisma client.
#
# Environment: CASCATA_BIN (default bin/cascata), CASCATA_CONFIG (default
# cascata.toml), COMPAT_ONLY (regex of client names to run),
# COMPAT_VERBOSE=1 (print every check), COMPAT_KEEP=1 (keep the temp dir),
# CASCATA_LOG_LEVEL (passed to the proxy; its log is demo.err in the temp dir).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/scripts/compat
BIN=${CASCATA_BIN:-$ROOT/bin/cascata}
CONFIG=${CASCATA_CONFIG:-$ROOT/cascata.toml}
ONLY=${COMPAT_ONLY:-.}
PY=/usr/bin/python3 # Debian's python3-psycopg2/python3-asyncpg live here, not in a pyenv
JDBC_JAR=/usr/share/java/postgresql.jar
[ -d /usr/local/go/bin ] && export PATH="/usr/local/go/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

# Only the variables set below may steer libpq.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^PG' || true)
export PGCONNECT_TIMEOUT=10

PASSED=0
FAILED=0
WORK=""
DEMO_PID=""

say() { printf 'compat: %s\n' "$*"; }
summary() { printf 'compat: %d passed, %d failed\n' "$PASSED" "$FAILED"; }
wanted() { [[ $1 =~ $ONLY ]]; }
any_wanted() { # any_wanted NAME...: is one of these clients to run?
  local n
  for n; do wanted "$n" && return 0; done
  return 1
}

DEMO_STOP_SECONDS=30
# shellcheck source=scripts/demo-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../demo-lib.sh"

cleanup() {
  local rc=$?
  trap - EXIT
  # Background jobs of this script (psql holding a transaction, a client
  # that outlived its timeout): by their own pids.
  local p
  for p in $(jobs -p); do
    [ "$p" = "$DEMO_PID" ] || kill "$p" 2>/dev/null || true
  done
  stop_demo
  remove_work "${COMPAT_KEEP:-0}"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# record NAME STATUS REASON: one line per client.
record() {
  if [ "$2" = ok ]; then
    PASSED=$((PASSED + 1))
    say "$1 ok $3"
  else
    FAILED=$((FAILED + 1))
    say "$1 FAIL $3"
  fi
}

# run_client NAME TIMEOUT CMD...: runs a client that prints
# "check NAME ok|FAIL|skip ..." lines and records its outcome.
run_client() {
  local name=$1 limit=$2 log rc=0 start secs oks fails skips
  shift 2
  wanted "$name" || return 0
  log="$WORK/logs/${name//\//_}.log"
  start=$(date +%s%N)
  timeout -k 5 "$limit" "$@" >"$log" 2>&1 || rc=$?
  secs=$(awk -v n=$(($(date +%s%N) - start)) 'BEGIN { printf "%.1f", n / 1e9 }')
  if [ "${COMPAT_VERBOSE:-0}" = 1 ]; then sed 's/^/    | /' "$log"; fi
  oks=$(grep -c '^check [^ ]* ok' "$log")
  fails=$(sed -n 's/^check \([^ ]*\) FAIL \(.*\)/\1: \2/p' "$log" | awk 'NR > 1 { printf "; " } { printf "%s", $0 }')
  skips=$(sed -n 's/^check \([^ ]*\) skip .*/\1/p' "$log" | awk 'NR > 1 { printf ", " } { printf "%s", $0 }')
  [ "$rc" -eq 124 ] && fails="${fails:+$fails; }timed out after ${limit}s"
  if [ "$rc" -eq 0 ] && [ -z "$fails" ] && [ "$oks" -gt 0 ]; then
    record "$name" ok "($oks checks${skips:+, skipped: $skips}, ${secs}s)"
  elif [ -n "$fails" ]; then
    record "$name" FAIL "$fails (${oks} other checks ok, ${secs}s)"
  else
    record "$name" FAIL "exit $rc: $(grep -v '^check .* ok' "$log" | tail -n 3 | tr '\n' ' ' | tr -s ' ')"
  fi
}

# --- dependencies ---------------------------------------------------------------
APT_UPDATED=0
MISSING=() # "client-regex|reason"

# apt_install PKG...: installs Debian packages when root; returns 1 otherwise.
apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    return 1
  fi
  if [ "$APT_UPDATED" = 0 ]; then
    apt-get update -qq >/dev/null || return 1
    APT_UPDATED=1
  fi
  apt-get install -y -qq "$@" >/dev/null
}

# need CLIENT_REGEX WHAT TEST PKG...: the clients matching CLIENT_REGEX need
# WHAT, present when TEST succeeds; installs the packages if it does not.
need() {
  local clients=$1 what=$2 test=$3
  shift 3
  eval "$test" >/dev/null 2>&1 && return 0
  say "installing $*"
  if apt_install "$@" && eval "$test" >/dev/null 2>&1; then
    return 0
  fi
  MISSING+=("$clients|$what is missing (as root: apt-get install -y $*)")
  return 1
}

missing_reason() { # missing_reason CLIENT: prints why it cannot run, if so
  local m
  for m in "${MISSING[@]+"${MISSING[@]}"}"; do
    if [[ $1 =~ ${m%%|*} ]]; then
      printf '%s\n' "${m#*|}"
      return 0
    fi
  done
  return 1
}

[ -x "$BIN" ] || { echo "compat: $BIN is missing: run make build" >&2; exit 1; }
command -v go >/dev/null || { echo "compat: go is missing" >&2; exit 1; }
# The PostgreSQL server binaries (the demo), psql and pgbench.
"$ROOT/scripts/install-postgres.sh" || exit 1
need '^(psycopg2|asyncpg)$' "$PY with psycopg2 and asyncpg" "$PY -c 'import psycopg2, asyncpg'" python3-psycopg2 python3-asyncpg
need '^pgjdbc$' "java or $JDBC_JAR" "command -v java && test -f $JDBC_JAR" libpostgresql-jdbc-java default-jre-headless
# Prisma 7 wants node >= 20.19.
need '^(node-postgres|typeorm|prisma)$' "node >= 20.19 with npm" \
  "command -v npm && node -e 'const [a, b] = process.versions.node.split(\".\").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)'" nodejs npm

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cascata-compat.XXXXXX")
chmod 755 "$WORK" # the postgres OS user must reach the cluster when run as root
mkdir -p "$WORK/logs"
T0=$(date +%s)

# node: npm ci when the lockfile changed since the last install, then the
# Prisma client (the schema engine is a native download: skipped).
NODE_DIR=$HERE/node
if any_wanted node-postgres typeorm prisma && ! missing_reason node-postgres >/dev/null; then
  stamp=$(cat "$NODE_DIR/package-lock.json" "$NODE_DIR/prisma/schema.prisma" | sha256sum | cut -c1-16)
  if [ "$(cat "$NODE_DIR/node_modules/.compat-stamp" 2>/dev/null)" != "$stamp" ]; then
    if ! (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error >"$WORK/logs/npm-ci.log" 2>&1); then
      MISSING+=("^(node-postgres|typeorm|prisma)$|npm ci failed: $(tail -n 3 "$WORK/logs/npm-ci.log" | tr '\n' ' ')")
    elif ! (cd "$NODE_DIR" && PRISMA_SCHEMA_ENGINE_BINARY=/bin/false ./node_modules/.bin/prisma generate >"$WORK/logs/prisma-generate.log" 2>&1); then
      MISSING+=("^prisma$|prisma generate failed: $(tail -n 3 "$WORK/logs/prisma-generate.log" | tr '\n' ' ')")
    else
      echo "$stamp" >"$NODE_DIR/node_modules/.compat-stamp"
    fi
  fi
fi

# Go: one binary for pgx (every QueryExecMode) and lib/pq.
if any_wanted pgx/cache_statement lib/pq pgx/deallocate_all && ! (cd "$ROOT" && go build -o "$WORK/gocompat" ./scripts/compat/gocompat) >"$WORK/logs/go-build.log" 2>&1; then
  MISSING+=("^(pgx|lib/pq)|go build ./scripts/compat/gocompat failed: $(tail -n 3 "$WORK/logs/go-build.log" | tr '\n' ' ')")
fi

# --- the cluster and the proxy ----------------------------------------------------
T1=$(date +%s)
# The user's config, forced into transaction mode; a stuck session must not
# hold the shutdown for long.
sed -e 's/^\([[:space:]]*pool_mode[[:space:]]*=\).*/\1 "transaction"/' \
  -e 's/^\([[:space:]]*shutdown_timeout[[:space:]]*=\).*/\1 "5s"/' "$CONFIG" >"$WORK/cascata.toml"
env -u DEMO_JWT_SECRET -u CASCATA_ADMIN_TOKEN "$BIN" demo -config "$WORK/cascata.toml" -dir "$WORK/demo" \
  -listen 127.0.0.1:0 -admin-listen 127.0.0.1:0 >"$WORK/demo.out" 2>"$WORK/demo.err" &
DEMO_PID=$!
for _ in $(seq 1 900); do
  grep -q '^Cascata demo is ready' "$WORK/demo.out" 2>/dev/null && break
  kill -0 "$DEMO_PID" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q '^Cascata demo is ready' "$WORK/demo.out"; then
  tail -n 20 "$WORK/demo.err" | sed 's/^/    | /'
  say "setup failed: cascata demo did not become ready"
  FAILED=$((FAILED + 1))
  summary
  exit 1
fi
PROXY=$(sed -n 's/^Cascata demo is ready: proxy \([^,]*\),.*/\1/p' "$WORK/demo.out")
HOST=${PROXY%:*}
PORT=${PROXY##*:}
PRIMARY_PORT=$(grep -o '"primary_port": *[0-9]*' "$WORK/demo/pg/cluster.json" | grep -o '[0-9]*$')
REPLICA_PORT=$(grep -o '"replica_port": *[0-9]*' "$WORK/demo/pg/cluster.json" | grep -o '[0-9]*$')
say "demo ready in $(($(date +%s) - T1))s (set-up $((T1 - T0))s): proxy $PROXY (transaction mode), primary :$PRIMARY_PORT, replica :$REPLICA_PORT"

# direct PORT [psql args]: superuser straight to a server of the cluster.
direct() {
  local port=$1
  shift
  PGHOST=127.0.0.1 PGPORT=$port PGDATABASE=demo PGUSER=postgres timeout 60 psql -X -q -At -v ON_ERROR_STOP=1 "$@"
}

CLIENTS="pgx_cache_statement pgx_cache_describe pgx_describe_exec pgx_exec pgx_simple_protocol lib_pq
node_postgres typeorm prisma psycopg2 asyncpg pgjdbc psql"
{
  echo "create schema myschema;"
  echo "create table myschema.compat_marker (v text); insert into myschema.compat_marker values ('myschema');"
  echo "grant usage on schema myschema to authenticated; grant select on myschema.compat_marker to authenticated;"
  for c in $CLIENTS; do
    echo "create table public.compat_$c (id int primary key, name text not null, qty int not null default 0);"
    echo "grant select, insert, update, delete on public.compat_$c to authenticated;"
  done
} >"$WORK/setup.sql"
direct "$PRIMARY_PORT" -f "$WORK/setup.sql" >"$WORK/logs/setup.log" 2>&1 || {
  cat "$WORK/logs/setup.log"
  say "setup failed: tables"
  exit 1
}
if any_wanted pgbench/simple pgbench/extended pgbench/prepared; then
  PGHOST=127.0.0.1 PGPORT=$PRIMARY_PORT PGUSER=postgres timeout 60 pgbench -i -q -s 1 demo >"$WORK/logs/pgbench-init.log" 2>&1 &&
    direct "$PRIMARY_PORT" -c "grant select, insert, update on pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history to authenticated" ||
    MISSING+=("^pgbench|pgbench -i on the primary failed: $(tail -n 2 "$WORK/logs/pgbench-init.log" | tr '\n' ' ')")
fi
# Reads may go to the replica: wait until it has the tables.
lsn=$(direct "$PRIMARY_PORT" -c "select pg_current_wal_lsn()")
for _ in $(seq 1 300); do
  [ "$(direct "$REPLICA_PORT" -c "select pg_last_wal_replay_lsn() >= '$lsn'::pg_lsn" 2>/dev/null)" = t ] && break
  sleep 0.1
done

export DEMO_JWT_SECRET
DEMO_JWT_SECRET=$(cat "$WORK/demo/jwt_secret")
TOKEN=$("$BIN" token -config "$WORK/cascata.toml" -project demo -role authenticated -sub compat-user -ttl 30m) || {
  say "setup failed: cascata token"
  exit 1
}
URL="postgres://authenticated:$TOKEN@$HOST:$PORT/demo"

# --- psql -----------------------------------------------------------------------
# through [psql args]: psql as authenticated through the proxy.
through() {
  PGHOST=$HOST PGPORT=$PORT PGDATABASE=demo PGUSER=authenticated PGPASSWORD=$TOKEN PGAPPNAME=cascata-compat \
    timeout 30 psql -X -q -At -v ON_ERROR_STOP=1 "$@"
}
# pcheck NAME FUNCTION: a check of the bash clients.
pcheck() {
  local out rc=0 start
  start=$(date +%s%N)
  out=$("$2" 2>&1) || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "check $1 ok $((($(date +%s%N) - start) / 1000000))ms $(printf '%s\n' "$out" | sed -n 's/^note: //p' | tr '\n' ' ')"
  else
    echo "check $1 FAIL $(printf '%s\n' "$out" | grep -v '^note: ' | tail -n 4 | tr '\n' ' ' | tr -s ' ')"
  fi
}
want_eq() { [ "$2" = "$3" ] || { printf "%s: want '%s', got '%s'\n" "$1" "$2" "$3"; return 1; }; }
BACKEND="inet_server_port()::text || ':' || pg_backend_pid()"
# steal FILE: takes the backend named in FILE (port:pid) away from the
# client under test, so that its next transaction runs on another one:
# starts psql sessions in the background that each hold a transaction (on
# the primary) for 2 s, until one of them runs on that backend. The psql
# clients run it with \! bash $WORK/steal.sh FILE between statements
# (\! runs sh, which does not see exported bash functions).
steal() {
  local target k f i
  target=$(cat "$1")
  for k in $(seq 1 15); do
    f=$WORK/psql_hold.$$.$k
    rm -f "$f"
    printf '%s\n' "begin;" "select $BACKEND \\g $f" "select pg_sleep(2);" "commit;" |
      psql -X -q -At >/dev/null 2>"$f.err" &
    for i in $(seq 1 100); do
      [ -s "$f" ] || [ -s "$f.err" ] && break
      sleep 0.02
    done
    if [ -s "$f.err" ]; then # a holder that fails is a finding too
      echo "holding session: $(head -n 1 "$f.err")" >>"$WORK/psql_steal_errors"
    fi
    if [ "$(cat "$f" 2>/dev/null)" = "$target" ]; then
      echo 1 >>"$WORK/psql_steals"
      return 0
    fi
  done
}
# steal_errors: fails with the errors of holding sessions, if any.
steal_errors() {
  [ -s "$WORK/psql_steal_errors" ] || return 0
  sort -u "$WORK/psql_steal_errors"
  rm -f "$WORK/psql_steal_errors"
  return 1
}

T=compat_psql
p_connect() { want_eq current_user authenticated "$(through -c 'select current_user')"; }
p_crud() {
  local out
  out=$(through -c "insert into $T values (1, 'one', 1)" -c "select name, qty from $T where id = 1" \
    -c "update $T set qty = qty + 41 where id = 1" -c "select qty from $T where id = 1" \
    -c "delete from $T where id = 1" -c "select count(*) from $T where id = 1") || return 1
  want_eq "select/update/delete" "one|1 42 0" "$(echo $out)"
}
p_rollback() {
  local out
  out=$(through -c "begin; insert into $T values (2, 'two', 2); select count(*) from $T where id = 2; rollback" \
    -c "select count(*) from $T where id = 2") || return 1
  want_eq "inside, after rollback" "1 0" "$(echo $out)"
}
# SQL-level PREPARE/EXECUTE, each EXECUTE its own transaction; after the
# first and second inserts, other sessions take the backend they ran on.
p_prepared() {
  local out n steals
  rm -f "$WORK"/psql_be? "$WORK/psql_steals"
  out=$(through 2>&1 <<EOF
prepare psql_ins (int, text, int) as insert into $T (id, name, qty) values (\$1, \$2, \$3) returning $BACKEND;
prepare psql_sel (int) as select name from $T where id = \$1;
execute psql_ins (101, 'p1', 1) \g $WORK/psql_be1
\! bash $WORK/steal.sh "$WORK/psql_be1"
execute psql_ins (102, 'p2', 2) \g $WORK/psql_be2
execute psql_sel (101);
execute psql_sel (102);
\! bash $WORK/steal.sh "$WORK/psql_be2"
execute psql_ins (103, 'p3', 3) \g $WORK/psql_be3
execute psql_sel (103);
deallocate psql_ins;
deallocate psql_sel;
EOF
  ) || { printf '%s\n' "$out"; return 1; }
  steal_errors || return 1
  want_eq "names" "p1 p2 p3" "$(echo $out)" || return 1
  n=$(cat "$WORK"/psql_be? | sort -u | wc -l)
  steals=$(cat "$WORK/psql_steals" 2>/dev/null | wc -l)
  echo "note: (insert ran on $n primary backends, $steals steals)"
  [ "$n" -ge 2 ] || { echo "the prepared insert ran on one backend only: re-preparing was not exercised"; return 1; }
}
p_error_then_ok() {
  local out rc=0 want
  out=$(printf '%s\n' "select 1/0;" "select 'after-error';" "begin;" "select * from no_such_table;" \
    "select 'in-aborted-txn';" "rollback;" "select 'after-rollback';" | through -v ON_ERROR_STOP=0 2>&1) || rc=$?
  want_eq "psql exit status" 0 "$rc" || return 1
  for want in "division by zero" "after-error" "no_such_table" "current transaction is aborted" "after-rollback"; do
    printf '%s\n' "$out" | grep -q -- "$want" || { echo "missing in output: $want"; printf '%s\n' "$out"; return 1; }
  done
}
# SET, then other sessions take the backend the client ran on.
p_search_path() {
  local out
  out=$(through 2>&1 <<EOF
set search_path to myschema, public;
/* cascata:primary */ select $BACKEND \g $WORK/psql_sp_be
\! bash $WORK/steal.sh "$WORK/psql_sp_be"
/* cascata:primary */ select v from compat_marker;
select v from compat_marker;
show search_path;
EOF
  ) || { printf '%s\n' "$out"; return 1; }
  steal_errors || return 1
  want_eq "compat_marker.v (hint, no hint), show search_path" "myschema myschema myschema, public" "$(echo $out)"
}
p_copy() {
  local in=$WORK/psql_in.tsv out=$WORK/psql_out.tsv d
  seq 1000 1099 | awk '{ printf "%d\tcopy %d\t%d\n", $1, $1, $1 % 7 }' >"$in"
  through -c "\\copy $T (id, name, qty) from '$in'" || return 1
  through -c "\\copy (select id, name, qty from $T where id >= 1000 order by id) to '$out'" || return 1
  cmp -s "$in" "$out" || { echo "\\copy out differs from \\copy in"; return 1; }
  d=$(through -c "\\d $T") || return 1
  printf '%s\n' "$d" | grep -q '^qty|integer' || { echo "\\d $T: no qty column in: $d"; return 1; }
  echo "note: (\\copy in/out, \\d)"
}
# psql sends a CancelRequest on SIGINT (run directly, so that it gets it).
p_cancel() {
  local out=$WORK/psql_cancel.out pid start ms rc=0
  start=$(date +%s%N)
  PGHOST=$HOST PGPORT=$PORT PGDATABASE=demo PGUSER=authenticated PGPASSWORD=$TOKEN \
    psql -X -At -c 'select pg_sleep(5)' >"$out" 2>&1 &
  pid=$!
  sleep 0.5
  kill -INT "$pid"
  wait "$pid" || rc=$?
  ms=$((($(date +%s%N) - start) / 1000000))
  grep -q 'canceling statement due to user request' "$out" || { echo "exit $rc after ${ms}ms: $(cat "$out")"; return 1; }
  [ "$ms" -lt 2500 ] || { echo "cancel took ${ms}ms"; return 1; }
  echo "note: (after ${ms}ms)"
}
# Statement names are per client: a name another client left prepared
# (it disconnected without DEALLOCATE) must not collide.
p_prepare_isolation() {
  local i out
  through -c "prepare psql_leak as select 1" || return 1
  for i in 1 2 3; do
    out=$(through -c "prepare psql_leak as select 2" -c "execute psql_leak" 2>&1) || { echo "client $i: $out"; return 1; }
    want_eq "client $i" 2 "$out" || return 1
  done
}
# DEALLOCATE ALL drops this client's statements only: the proxy's own
# statements on that backend must survive (the search_path round trip needs
# them).
p_deallocate_all() {
  local out
  out=$(printf '%s\n' "prepare psql_gone as select 1;" "deallocate all;" "execute psql_gone;" | through -v ON_ERROR_STOP=0 2>&1)
  printf '%s\n' "$out" | grep -q 'prepared statement "psql_gone" does not exist' || { echo "EXECUTE after DEALLOCATE ALL: $out"; return 1; }
  out=$(through 2>&1 <<EOF
deallocate all;
set search_path to myschema, public;
/* cascata:primary */ select $BACKEND \g $WORK/psql_da_be
\! bash $WORK/steal.sh "$WORK/psql_da_be"
/* cascata:primary */ select v from compat_marker;
EOF
  ) || { printf '%s\n' "$out"; return 1; }
  steal_errors || return 1
  want_eq "compat_marker.v after DEALLOCATE ALL" myschema "$out"
}
psql_client() {
  pcheck connect p_connect
  pcheck crud p_crud
  pcheck rollback p_rollback
  pcheck prepared p_prepared
  pcheck error_then_ok p_error_then_ok
  pcheck search_path p_search_path
  pcheck copy p_copy
  pcheck cancel p_cancel
  pcheck prepare_isolation p_prepare_isolation
}

# --- pgbench ----------------------------------------------------------------------
# pgbench_client MODE: the TPC-B-like script (explicit transactions with
# writes) and the select-only one, 4 clients each.
pgbench_run() { # pgbench_run NAME SECONDS ARGS...
  local name=$1 secs=$2 out failed tps
  shift 2
  out=$(PGHOST=$HOST PGPORT=$PORT PGUSER=authenticated PGPASSWORD=$TOKEN \
    timeout $((secs + 30)) pgbench -n -c 4 -j 2 -T "$secs" "$@" demo 2>&1) || { printf '%s\n' "$out" | tail -n 5; return 1; }
  failed=$(printf '%s\n' "$out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p')
  tps=$(printf '%s\n' "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | tail -n1)
  want_eq "$name failed transactions" 0 "${failed:-?}" || return 1
  awk -v t="$tps" 'BEGIN { exit !(t + 0 > 0) }' || { echo "$name: tps not > 0: '$tps'"; return 1; }
  echo "note: $name $(printf '%.0f' "$tps") tps"
}
pgbench_client() {
  local mode=$1
  pgbench_tpcb() { pgbench_run tpcb-like 3 -M "$mode" -b tpcb-like; }
  pgbench_select() { pgbench_run select-only 2 -M "$mode" -S; }
  pcheck tpcb_like pgbench_tpcb
  pcheck select_only pgbench_select
}

# --- the matrix -------------------------------------------------------------------
# client NAME TIMEOUT CMD...: runs the client unless it could not be installed.
client() {
  local name=$1 limit=$2 reason
  shift 2
  wanted "$name" || return 0
  if reason=$(missing_reason "$name"); then
    record "$name" FAIL "$reason"
    return 0
  fi
  run_client "$name" "$limit" "$@"
}

{
  declare -f steal
  echo 'steal "$@"'
} >"$WORK/steal.sh"
export -f pcheck want_eq through steal_errors p_connect p_crud p_rollback p_prepared p_error_then_ok p_search_path p_copy p_cancel \
  p_prepare_isolation p_deallocate_all psql_client pgbench_run pgbench_client
export HOST PORT TOKEN WORK T BACKEND

client psql 120 bash -c psql_client
for m in simple extended prepared; do
  client "pgbench/$m" 60 bash -c "pgbench_client $m"
done
for m in cache_statement cache_describe describe_exec exec simple_protocol; do
  client "pgx/$m" 60 "$WORK/gocompat" -client pgx -mode "$m" -url "$URL" -table "compat_pgx_$m"
done
# lib/pq's default sslmode is require; the proxy here has no TLS.
client lib/pq 60 "$WORK/gocompat" -client libpq -url "$URL?sslmode=disable" -table compat_lib_pq
client node-postgres 60 node "$NODE_DIR/pg.js" "$URL" compat_node_postgres
client typeorm 60 node "$NODE_DIR/typeorm.js" "$URL" compat_typeorm
# jiti runs the generated TypeScript client; its default interop breaks
# the Prisma runtime's require("node:path").
client prisma 90 env JITI_INTEROP_DEFAULT=0 "$NODE_DIR/node_modules/.bin/jiti" "$NODE_DIR/prisma.ts" "$URL" compat_prisma
client psycopg2 60 "$PY" "$HERE/python/compat.py" psycopg2 "$URL" compat_psycopg2
client asyncpg 60 "$PY" "$HERE/python/compat.py" asyncpg "$URL" compat_asyncpg
client pgjdbc 90 java -cp "$JDBC_JAR" "$HERE/java/Compat.java" "$HOST" "$PORT" demo authenticated "$TOKEN" compat_pgjdbc
# Last: DEALLOCATE ALL (SQL, and pgx's DeallocateAll) followed by a SET
# that must be put in force on another backend. Passed through to a backend
# it drops the proxy's own statements there too, so these run after the
# others: whoever lands on that backend next must not notice.
client psql/deallocate_all 60 bash -c "pcheck connect p_connect; pcheck deallocate_all p_deallocate_all"
client pgx/deallocate_all 60 "$WORK/gocompat" -client pgx -mode cache_statement -only deallocate_all -url "$URL" -table compat_pgx_cache_statement

if ! kill -0 "$DEMO_PID" 2>/dev/null; then
  record "cascata" FAIL "the proxy exited during the run: $(tail -n 3 "$WORK/demo.err" | tr '\n' ' ')"
fi
stop_demo
# What the proxy logged as a warning (not counted: the clients' lines are the verdict).
warns=$(grep ' level=WARN ' "$WORK/demo.err" | sed 's/^time=[^ ]* level=WARN //; s/ project=[^ ]*//' | sort | uniq -c | sort -rn | head -n 4 |
  awk '{ $1 = $1 "x"; print }' | paste -sd ';' - | sed 's/;/; /g')
[ -z "$warns" ] || say "note: proxy warnings: $warns"
say "total $(($(date +%s) - T0))s"
summary
[ "$FAILED" -eq 0 ]
