# Shared by scripts/e2e.sh and scripts/compat/run.sh (sourced, not run):
# stopping the `cascata demo` they start and any PostgreSQL it left behind.
# The caller sets DEMO_PID and WORK and defines say().

# stop_demo sends SIGTERM to the demo and waits up to DEMO_STOP_SECONDS
# (default 60) for it to exit, then kills it.
stop_demo() {
  [ -n "${DEMO_PID:-}" ] || return 0
  kill -TERM "$DEMO_PID" 2>/dev/null || true
  local i
  for i in $(seq 1 $((${DEMO_STOP_SECONDS:-60} * 10))); do
    kill -0 "$DEMO_PID" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$DEMO_PID" 2>/dev/null; then
    say "demo did not stop after SIGTERM; killing it"
    kill -KILL "$DEMO_PID" 2>/dev/null || true
  fi
  wait "$DEMO_PID" 2>/dev/null || true
  DEMO_PID=""
}

# kill_postgres stops (immediate shutdown) any server left in the work dir.
kill_postgres() {
  local f pid
  for f in "$WORK"/demo/pg/*/postmaster.pid; do
    [ -f "$f" ] || continue
    pid=$(head -n1 "$f")
    [ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null || true
  done
}

# remove_work stops what the demo left in $WORK and removes it, unless
# keep is 1 (then it says where it is).
remove_work() {
  local keep=$1
  [ -n "$WORK" ] || return 0
  kill_postgres
  if [ "$keep" = 1 ]; then
    say "kept $WORK"
  else
    rm -rf "$WORK"
  fi
}
