# Install (Debian's `postgresql` package) and start PostgreSQL on localhost, make a role and a
# database for the tests, and export their URL as NAS_RUN_POSTGRES_URL. Idempotent: fine when
# PostgreSQL is already installed, running, and the role and database exist.
#
#   . .ci/postgres.sh          # CI and developers alike (as root, or with sudo for apt/su)
#   pytest -m postgres
#
# Sourced, it exports the URL into the calling shell; run as a script, it prints it.
# Any failure (no package, a server that does not start) is an error, never a warning.
# Settings: NAS_RUN_PG_USER / NAS_RUN_PG_PASSWORD / NAS_RUN_PG_DB (each default nasrun).

_nas_run_pg_setup() (
  set -euo pipefail
  # stdout carries the URL alone: everything the tools print (pg_ctlcluster's "Removed stale pid
  # file.", psql notices) goes to stderr, the URL to the saved stdout (fd 3)
  exec 3>&1 1>&2
  user=${NAS_RUN_PG_USER:-nasrun} password=${NAS_RUN_PG_PASSWORD:-nasrun} db=${NAS_RUN_PG_DB:-nasrun}
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! command -v pg_lsclusters >/dev/null 2>&1 || [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
    echo "postgres.sh: installing PostgreSQL (apt-get install postgresql)" >&2
    export DEBIAN_FRONTEND=noninteractive
    { $sudo apt-get update -q && $sudo apt-get install -y -q postgresql; } >/tmp/ci-postgres.log 2>&1 ||
      { tail -20 /tmp/ci-postgres.log >&2; echo "postgres.sh: could not install PostgreSQL" >&2; exit 1; }
  fi
  # the newest cluster Debian made (one per installed major version, "main" by default)
  read -r ver cluster port status _ < <(pg_lsclusters -h | sort -V | tail -1) ||
    { echo "postgres.sh: PostgreSQL is installed but has no cluster (pg_createcluster <ver> main)" >&2; exit 1; }
  if [ "$status" != "online" ]; then
    # pg_ctlcluster, not systemd: CI containers have no init system. 3>&-: the server must not
    # inherit fd 3, or the caller's $(...) would wait for it to exit
    $sudo pg_ctlcluster "$ver" "$cluster" start 3>&- ||
      { $sudo tail -20 "/var/log/postgresql/postgresql-$ver-$cluster.log" >&2 || true; exit 1; }
  fi
  for _ in $(seq 1 30); do
    pg_isready -q -h localhost -p "$port" && break
    sleep 1
  done
  pg_isready -h localhost -p "$port" >&2 || { echo "postgres.sh: server not ready on port $port" >&2; exit 1; }
  as_pg() { if [ -z "$sudo" ]; then su postgres -c "$1"; else sudo -u postgres sh -c "$1"; fi; }
  psql_pg="psql -X -q -v ON_ERROR_STOP=1 -p $port"
  # CREATEDB: the tests make a database of their own per test (and drop it)
  if [ "$(as_pg "$psql_pg -tAc \"select 1 from pg_roles where rolname = '$user'\"")" != "1" ]; then
    as_pg "$psql_pg -c \"create role $user login createdb password '$password'\""
  else
    as_pg "$psql_pg -c \"alter role $user login createdb password '$password'\""
  fi
  if [ "$(as_pg "$psql_pg -tAc \"select 1 from pg_database where datname = '$db'\"")" != "1" ]; then
    as_pg "createdb -p $port -O $user $db"
  fi
  echo "postgresql+psycopg://$user:$password@localhost:$port/$db" >&3
)

if [ "${BASH_SOURCE[0]}" != "$0" ]; then  # sourced: export the URL, keep the caller's shell options
  NAS_RUN_POSTGRES_URL=$(_nas_run_pg_setup) || { unset -f _nas_run_pg_setup; return 1; }
  export NAS_RUN_POSTGRES_URL
  echo "PostgreSQL ready: NAS_RUN_POSTGRES_URL=$NAS_RUN_POSTGRES_URL" >&2
  unset -f _nas_run_pg_setup
else
  _nas_run_pg_setup
fi
