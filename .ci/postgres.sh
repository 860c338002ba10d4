# Sourced by .ci/with-services.sh (`make test`): a throwaway PostgreSQL for the shared-backend test.
#   start_postgres   installs PostgreSQL from Debian's packages when absent, starts a cluster
#                    in a temp dir on 127.0.0.1 and a free port (password auth, no trust), and
#                    exports MONORAY_TEST_POSTGRES_URL; stop_postgres (run on EXIT) removes it.
# By hand: `source .ci/postgres.sh && start_postgres && trap stop_postgres EXIT`.

PG_DIR=""
PG_CTL=()

pg_bin() {
  # initdb/pg_ctl are not on Debian's PATH (pg_wrapper only covers the client tools).
  local dir
  if command -v initdb >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"
    return
  fi
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$dir/initdb" ] && { echo "$dir"; return; }
  done
  return 1
}

install_postgres() {
  local sudo=() started=$SECONDS
  [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
  echo "ci: PostgreSQL not found; installing it from Debian's packages" >&2
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    postgresql >/dev/null
  echo "ci: PostgreSQL installed in $((SECONDS - started)) s" >&2
}

start_postgres() {
  local bin port password as=()
  bin=$(pg_bin) || { install_postgres && bin=$(pg_bin); }
  PG_DIR=$(mktemp -d /tmp/monoray-pg.XXXXXX)
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  printf '%s\n' "$password" >"$PG_DIR/pwfile"
  if [ "$(id -u)" -eq 0 ]; then
    # initdb refuses to run as root: the cluster belongs to the packages' postgres user.
    chown -R postgres: "$PG_DIR"
    as=(runuser -u postgres --)
  fi
  "${as[@]}" "$bin/initdb" -D "$PG_DIR/data" -U monoray --pwfile="$PG_DIR/pwfile" \
    --auth=scram-sha-256 -E UTF8 --no-locale >"$PG_DIR/initdb.log"
  rm -f "$PG_DIR/pwfile"
  "${as[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 120 start \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_DIR -c fsync=off" >/dev/null
  PG_CTL=("${as[@]}" "$bin/pg_ctl")
  export MONORAY_TEST_POSTGRES_URL="postgresql://monoray:$password@127.0.0.1:$port/postgres"
  echo "ci: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" >&2
}

stop_postgres() {
  if [ -n "$PG_DIR" ] && [ -d "$PG_DIR/data" ] && [ "${#PG_CTL[@]}" -gt 0 ]; then
    "${PG_CTL[@]}" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  [ -n "$PG_DIR" ] && rm -rf "$PG_DIR"
  return 0
}
