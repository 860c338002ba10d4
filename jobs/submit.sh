#!/usr/bin/env bash
# Submit a sweep to a Ray cluster:
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/submit.sh search_spaces/demo.yaml --root /shared/monoray-runs
# Everything after the space is passed to `monoray sweep` (e.g. --name, --storage, --tracking-uri, --set).
#
# RAY_ADDRESS is the cluster's job server (the dashboard port). Keep it on 127.0.0.1 on the head and
# reach it through an SSH tunnel (ssh -L 8265:127.0.0.1:8265 head); never expose it publicly.
# Token auth stays on: with RAY_AUTH_MODE=token the client sends the cluster token from
# ~/.ray/auth_token, or from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH. Copy the head's token
# (`ray get-auth-token` on the head) to the client once and chmod 600 it.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the job server, e.g. http://127.0.0.1:8265}"
if [ $# -lt 1 ]; then
  echo "usage: jobs/submit.sh SPACE.yaml [monoray sweep options]" >&2
  exit 2
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] \
  && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  echo "jobs/submit.sh: no Ray token: copy the head's (ssh head ray get-auth-token > ~/.ray/auth_token; chmod 600 ~/.ray/auth_token) or set RAY_AUTH_TOKEN" >&2
  exit 2
fi
exec ray job submit \
  --address "$RAY_ADDRESS" \
  --runtime-env jobs/runtime_env.yaml \
  --working-dir . \
  -- python -m monoray sweep "$@"
