#!/usr/bin/env bash
# Makes sure the PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup),
# psql, pgbench and pgcrypto are present, and haproxy, which the fleet tests
# put in front of several instances. As root it installs Debian's packages;
# otherwise it prints the one command to run and fails.
set -euo pipefail
have_server() {
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/pg_basebackup" ] && [ -x "$d/pg_ctl" ] || continue
    ls /usr/share/postgresql/*/extension/pgcrypto.control >/dev/null 2>&1 || continue
    command -v psql >/dev/null && command -v pgbench >/dev/null && return 0
    [ -x "$d/pgbench" ] && return 0
  done
  return 1
}
have_haproxy() {
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ]
}
if have_server && have_haproxy; then
  exit 0
fi
pkgs="postgresql postgresql-contrib postgresql-client haproxy"
if [ "$(id -u)" -eq 0 ]; then
  echo "installing PostgreSQL server binaries: apt-get install -y $pkgs" >&2
  apt-get update -qq
  apt-get install -y -qq $pkgs >/dev/null
  # Debian starts a cluster on install; the tests start their own.
  if command -v pg_ctlcluster >/dev/null; then
    for c in /etc/postgresql/*/main; do
      [ -d "$c" ] || continue
      v=$(basename "$(dirname "$c")")
      pg_ctlcluster "$v" main stop >/dev/null 2>&1 || true
    done
  fi
  have_server || { echo "PostgreSQL binaries still missing after install" >&2; exit 1; }
  have_haproxy || { echo "haproxy still missing after install" >&2; exit 1; }
else
  echo "PostgreSQL server binaries or haproxy are missing. Install them with:" >&2
  echo "  sudo apt-get install -y $pkgs" >&2
  exit 1
fi
