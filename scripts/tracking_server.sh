#!/usr/bin/env bash
# A team tracking server on this machine's loopback: PostgreSQL (Debian's `postgresql` package) as the
# backend store and `mlflow server` serving the artifacts, so clients need nothing but the URL.
#
#   scripts/tracking_server.sh start  [--dir DIR] [--port 5000] [--pg-port 5433]
#   scripts/tracking_server.sh stop   [--dir DIR]
#   scripts/tracking_server.sh status [--dir DIR]
#
#   python train.py -m model.hidden=128,256 mlflow.tracking_uri=http://127.0.0.1:5000
#
# DIR (default mlruns/server) holds the database cluster (DIR/pg), the artifacts (DIR/artifacts), the logs
# and the pid files. Needs: postgresql (apt-get install postgresql), and mlflow + psycopg in the Python
# environment ($PYTHON, default `python`; pip install -e ".[dev]"). As root, PostgreSQL runs as the
# `postgres` user, which must be able to reach DIR. To serve a team, put it behind your network's access
# control and pass --host 0.0.0.0 (the default is loopback only).
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

start() {
    [ -x "$pg_bin/pg_ctl" ] || die "PostgreSQL not found in /usr/lib/postgresql/*/bin; install it: apt-get install postgresql (or set PG_BIN)"
    "$python" -c "import mlflow, psycopg" 2>/dev/null \
        || die "$python lacks mlflow or psycopg; run: pip install -e \".[dev]\" (or set PYTHON to the right interpreter)"
    if [ -f "$mlflow_pid" ] && kill -0 "$(cat "$mlflow_pid")" 2>/dev/null; then
        die "a tracking server from $dir is already running (pid $(cat "$mlflow_pid")); stop it first: $0 stop --dir $dir"
    fi
    if [ "$(id -u)" -eq 0 ]; then
        mkdir -p "$pgdata"
        chown postgres: "$pgdata"
        chmod 0700 "$pgdata"
        runuser -u postgres -- test -x "$pgdata" \
            || die "user postgres cannot reach $pgdata: make every folder above it readable (chmod o+rx) or use --dir elsewhere"
    fi
    if [ ! -f "$pgdata/PG_VERSION" ]; then
        as_pg "$pg_bin/initdb" -D "$pgdata" -A trust -U postgres --no-sync >"$dir/initdb.log" 2>&1 \
            || die "initdb failed; see $dir/initdb.log"
    fi
    if ! as_pg "$pg_bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
        as_pg "$pg_bin/pg_ctl" -D "$pgdata" -l "$pgdata/postgres.log" -w -t 60 \
            -o "-p $pg_port -k $pgdata -c listen_addresses=127.0.0.1" start >/dev/null \
            || die "PostgreSQL did not start on port $pg_port; see $pgdata/postgres.log (port taken? use --pg-port)"
    fi
    as_pg "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='mlflow'" \
        | grep -q 1 || as_pg "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres mlflow
    mkdir -p "$dir/artifacts"
    # Its own session (process group): `mlflow server` starts helper processes that outlive it; stop kills the group.
    setsid "$python" -m mlflow server \
        --backend-store-uri "postgresql://postgres@127.0.0.1:$pg_port/mlflow" \
        --serve-artifacts --artifacts-destination "$dir/artifacts" \
        --host "$host" --port "$port" --workers 2 >"$dir/mlflow.log" 2>&1 </dev/null &
    echo $! >"$mlflow_pid"
    for _ in $(seq 1 120); do
        if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
            echo "MLflow tracking server: http://127.0.0.1:$port (PostgreSQL on 127.0.0.1:$pg_port, artifacts in $dir/artifacts)"
            echo "use it with: python train.py mlflow.tracking_uri=http://127.0.0.1:$port ..."
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
