#!/usr/bin/env bash
# Runs "$@" as CI runs the tests (`make test`, `make test-all`; `.ci/run` is `make test`):
# CI=true (hypothesis' derandomized profile; the PostgreSQL test fails rather than skips)
# and a throwaway PostgreSQL (.ci/postgres.sh) exported as MONORAY_TEST_POSTGRES_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
export CI=true
source .ci/postgres.sh
trap stop_postgres EXIT
start_postgres
"$@"
