#!/usr/bin/env bash
# `make compat-suites`: the drivers' own test suites (pgx, lib/pq) directly
# and through cascata in session and transaction mode. Builds bin/cascata
# from the working tree, then runs the harness (main.go in this directory)
# under an outer timeout. Writes scripts/compat-suites/RESULTS.md on a full
# run. See README.md here for the environment variables.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
[ -d /usr/local/go/bin ] && export PATH="/usr/local/go/bin:$PATH"
LIMIT=${COMPAT_SUITES_TIMEOUT:-870}

go build -o bin/cascata ./cmd/cascata
go build -o bin/compat-suites ./scripts/compat-suites
exec timeout -k 30 "$LIMIT" bin/compat-suites "$@"
