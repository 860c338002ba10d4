#!/usr/bin/env bash
# Runs "$@" as CI runs the tests (`make test`, `make test-all`; `.ci/run` is `make test`):
# CI=true (hypothesis' derandomized profile; the PostgreSQL and browser tests fail rather
# than skip), a throwaway PostgreSQL (.ci/postgres.sh) exported as MONORAY_TEST_POSTGRES_URL,
# and Debian's Chromium (.ci/chromium.sh) exported as MONORAY_TEST_CHROMIUM.
set -euo pipefail
cd "$(dirname "$0")/.."
export CI=true
source .ci/postgres.sh
source .ci/chromium.sh
trap stop_postgres EXIT
ensure_chromium
start_postgres
"$@"
