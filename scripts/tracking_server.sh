#!/usr/bin/env bash
# A team tracking server on this machine: PostgreSQL (Debian's `postgresql` package) as the backend store and
# `mlflow server` with MLflow's basic-auth app, serving the artifacts, so clients need the URL and a login.
#
#   scripts/tracking_server.sh start  [--dir DIR] [--port 5000] [--pg-port 5433] [--host 127.0.0.1]
#   scripts/tracking_server.sh stop   [--dir DIR]
#   scripts/tracking_server.sh status [--dir DIR]
#
#   set -a; . mlruns/server/credentials; set +a       # MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD
#   python train.py -m model.hidden=128,256 mlflow.tracking_uri=http://127.0.0.1:5000
#
# Every connection needs a password: PostgreSQL is created with scram-sha-256 for every connection (no `trust`,
# no `peer`) and listens on 127.0.0.1 only; MLflow answers 401 to any request without a valid login (except
# /health). The first start generates the passwords (MLflow's admin: MLFLOW_TRACKING_USERNAME, default admin,
# and MLFLOW_TRACKING_PASSWORD, 12 or more characters, when set at the first start) and writes, mode 0600:
#   DIR/credentials    the MLflow login, an env file for clients (never put it in the URL)
#   DIR/pgpass         PostgreSQL's passwords (roles postgres, the superuser, and mlflow, what the server uses),
#                      libpq's format: PGPASSFILE=DIR/pgpass psql -h 127.0.0.1 -p 5433 -U postgres
#   DIR/auth.ini, DIR/flask_secret   the basic-auth app's settings and its session key
# DIR (default mlruns/server) also holds the database cluster (DIR/pg), the artifacts (DIR/artifacts), the logs
# and the pid files. Needs: postgresql (apt-get install postgresql), and mlflow + psycopg in the Python
# environment ($PYTHON, default `python`; pip install -e ".[team]"). As root, PostgreSQL runs as the
# `postgres` user, which must be able to reach DIR. --host 0.0.0.0 serves other machines: the login then
# crosses the network, in clear text unless a TLS reverse proxy stands in front (docs/TEAM.md).
set -euo pipefail

cmd="${1:-}"
[ $# -gt 0 ] && shift
dir="mlruns/server"
port=5000
pg_port=5433
host=127.0.0.1
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) dir="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --pg-port) pg_port="$2"; shift 2 ;;
        --host) host="$2"; shift 2 ;;
        *) echo "error: unknown option $1; see the top of $0 for usage" >&2; exit 2 ;;
    esac
done
python="${PYTHON:-python}"

die() { echo "error: $*" >&2; exit 1; }

pg_bin="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
as_pg() {  # PostgreSQL refuses to run as root: use its own user then
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
pgdata="$dir/pg"
mlflow_pid="$dir/mlflow.pid"

secret() { "$python" -c 'import secrets; print(secrets.token_urlsafe(24))'; }

write_private() {  # FILE: stdin to FILE, readable by its owner only (0600) from the first byte
    (umask 077 && cat >"$1.tmp") && chmod 0600 "$1.tmp" && mv -f "$1.tmp" "$1"
}

pg_password() {  # ROLE: its password in DIR/pgpass
    awk -F: -v role="$1" '$4 == role { print $5; exit }' "$dir/pgpass"
}

credentials() {  # the MLflow login: kept from DIR/credentials, else given (environment) or generated
    if [ -f "$dir/credentials" ]; then
        chmod 0600 "$dir/credentials"
        return 0
    fi
    local user="${MLFLOW_TRACKING_USERNAME:-admin}" password="${MLFLOW_TRACKING_PASSWORD:-}"
    [ -n "$password" ] || password="$(secret)"
    # The file is sourced by shells: nothing a shell would interpret.
    [[ "$user" =~ ^[A-Za-z0-9._@-]+$ ]] \
        || die "MLFLOW_TRACKING_USERNAME=$user: use letters, digits and ._@- only"
    [[ "$password" =~ ^[A-Za-z0-9._~@%+=,:-]{12,}$ ]] \
        || die "MLFLOW_TRACKING_PASSWORD: use 12 or more letters, digits or ._~@%+=,:- (or leave it unset: one is generated)"
    printf '%s\n' "# The login of the MLflow server of $dir (mode 0600: keep it so). Clients:" \
        "#   set -a; . $dir/credentials; set +a" "MLFLOW_TRACKING_USERNAME=$user" \
        "MLFLOW_TRACKING_PASSWORD=$password" | write_private "$dir/credentials"
}

credential() {  # NAME: its value in DIR/credentials
    sed -n "s/^$1=//p" "$dir/credentials" | head -n 1
}

setup_postgres() {  # a cluster in which every connection needs a password; the mlflow role and its databases
    if [ "$(id -u)" -eq 0 ]; then
        mkdir -p "$pgdata"
        chown postgres: "$pgdata"
        chmod 0700 "$pgdata"
        runuser -u postgres -- test -x "$pgdata" \
            || die "user postgres cannot reach $pgdata: make every folder above it readable (chmod o+rx) or use --dir elsewhere"
    fi
    if [ ! -f "$pgdata/PG_VERSION" ]; then
        printf '%s\n' "127.0.0.1:*:*:postgres:$(secret)" "127.0.0.1:*:*:mlflow:$(secret)" | write_private "$dir/pgpass"
        local pwfile="$dir/initdb.pw"  # initdb reads the superuser's password from a file its user can read
        pg_password postgres | write_private "$pwfile"
        [ "$(id -u)" -ne 0 ] || chown postgres: "$pwfile"
        if ! as_pg "$pg_bin/initdb" -D "$pgdata" -U postgres --auth=scram-sha-256 --pwfile="$pwfile" --no-sync \
            >"$dir/initdb.log" 2>&1; then
            rm -f "$pwfile"
            die "initdb failed; see $dir/initdb.log"
        fi
        rm -f "$pwfile"
    fi
    if grep -Eq '^[[:space:]]*[^#[:space:]].*[[:space:]](trust|peer|ident)([[:space:]]|$)' "$pgdata/pg_hba.conf"; then
        die "$pgdata lets local accounts in without a password (made by an older $0: initdb -A trust); stop it, move it aside and start again, or set scram-sha-256 in its pg_hba.conf and put the passwords in $dir/pgpass"
    fi
    [ -f "$dir/pgpass" ] || die "$dir/pgpass (the PostgreSQL passwords) is missing; restore it or start over in a new --dir"
    chmod 0600 "$dir/pgpass"
    if ! as_pg "$pg_bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
        as_pg "$pg_bin/pg_ctl" -D "$pgdata" -l "$pgdata/postgres.log" -w -t 60 \
            -o "-p $pg_port -k $pgdata -c listen_addresses=127.0.0.1" start >/dev/null \
            || die "PostgreSQL did not start on port $pg_port; see $pgdata/postgres.log (port taken? use --pg-port)"
    fi
    # The statements on stdin, not the command line: no password shows in ps.
    PGPASSFILE="$dir/pgpass" "$pg_bin/psql" -X -q -w -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres \
        -d postgres >/dev/null 2>"$dir/psql.log" <<SQL || die "cannot set up PostgreSQL's mlflow role and databases; see $dir/psql.log"
SELECT 'CREATE ROLE mlflow' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlflow') \gexec
ALTER ROLE mlflow WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '$(pg_password mlflow)';
SELECT 'CREATE DATABASE mlflow OWNER mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow') \gexec
SELECT 'CREATE DATABASE mlflow_auth OWNER mlflow'
    WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow_auth') \gexec
SQL
}

start() {
    [ -x "$pg_bin/pg_ctl" ] || die "PostgreSQL not found in /usr/lib/postgresql/*/bin; install it: apt-get install postgresql (or set PG_BIN)"
    "$python" -c "import mlflow, psycopg, flask_wtf" 2>/dev/null \
        || die "$python lacks mlflow, psycopg or Flask-WTF (the basic-auth app); run: pip install -e \".[team]\" (or set PYTHON to the right interpreter)"
    if [ -f "$mlflow_pid" ] && kill -0 "$(cat "$mlflow_pid")" 2>/dev/null; then
        die "a tracking server from $dir is already running (pid $(cat "$mlflow_pid")); stop it first: $0 stop --dir $dir"
    fi
    credentials
    setup_postgres
    [ -f "$dir/flask_secret" ] || secret | write_private "$dir/flask_secret"
    # The basic-auth app's users and permissions live in PostgreSQL too (database mlflow_auth). A successful
    # login is remembered for 60 s per worker: checking the password hash on every request costs ~0.1 s.
    printf '%s\n' "[mlflow]" "default_permission = READ" \
        "database_uri = postgresql+psycopg://mlflow@127.0.0.1:$pg_port/mlflow_auth" \
        "admin_username = $(credential MLFLOW_TRACKING_USERNAME)" "auth_cache_ttl_seconds = 60" \
        | write_private "$dir/auth.ini"
    mkdir -p "$dir/artifacts"
    local url="http://127.0.0.1:$port"
    [ "$host" = 127.0.0.1 ] || [ "$host" = localhost ] || url="http://$(hostname -f 2>/dev/null || hostname):$port"
    # Its own session (process group): `mlflow server` starts helper processes that outlive it; stop kills the group.
    # Secrets travel in files and the environment (readable by this user only), never on the command line.
    PGPASSFILE="$dir/pgpass" MLFLOW_AUTH_CONFIG_PATH="$dir/auth.ini" \
        MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$dir/flask_secret")" \
        MLFLOW_AUTH_ADMIN_PASSWORD="$(credential MLFLOW_TRACKING_PASSWORD)" \
        setsid "$python" -m mlflow server --app-name basic-auth \
        --backend-store-uri "postgresql+psycopg://mlflow@127.0.0.1:$pg_port/mlflow" \
        --serve-artifacts --artifacts-destination "$dir/artifacts" \
        --host "$host" --port "$port" --workers 2 >"$dir/mlflow.log" 2>&1 </dev/null &
    echo $! >"$mlflow_pid"
    for _ in $(seq 1 120); do
        if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
            echo "MLflow tracking server: $url, with a login (PostgreSQL on 127.0.0.1:$pg_port, artifacts in $dir/artifacts)"
            echo "its login (user $(credential MLFLOW_TRACKING_USERNAME)) is in $dir/credentials, mode 0600; clients load it into MLflow's variables:"
            echo "    set -a; . $dir/credentials; set +a"
            echo "    python train.py mlflow.tracking_uri=$url ..."
            echo "  (or ~/.mlflow/credentials, section [mlflow]: mlflow_tracking_username, mlflow_tracking_password; never in the URL)"
            if [ "$url" != "http://127.0.0.1:$port" ]; then
                echo "warning: listening on $host without TLS: the login crosses the network readable; put a TLS reverse proxy in front (docs/TEAM.md)" >&2
            fi
            return 0
        fi
        kill -0 "$(cat "$mlflow_pid")" 2>/dev/null || break
        sleep 0.5
    done
    tail -n 20 "$dir/mlflow.log" >&2 || true
    stop >/dev/null 2>&1 || true
    die "mlflow server did not answer on port $port; its log is above (port taken? use --port)"
}

stop() {
    if [ -f "$mlflow_pid" ]; then
        pid="$(cat "$mlflow_pid")"
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do
            kill -0 -- "-$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
        rm -f "$mlflow_pid"
    fi
    if [ -x "$pg_bin/pg_ctl" ] && [ -f "$pgdata/PG_VERSION" ]; then
        as_pg "$pg_bin/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null 2>&1 || true
    fi
    echo "stopped the tracking server of $dir"
}

status() {
    if [ -f "$mlflow_pid" ] && kill -0 "$(cat "$mlflow_pid")" 2>/dev/null; then
        echo "mlflow server: running (pid $(cat "$mlflow_pid"))"
    else
        echo "mlflow server: stopped"
    fi
    if [ -x "$pg_bin/pg_ctl" ] && as_pg "$pg_bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
        echo "postgresql: running"
    else
        echo "postgresql: stopped"
    fi
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [--dir DIR] [--port PORT] [--pg-port PORT] [--host HOST]" >&2; exit 2 ;;
esac
