#!/usr/bin/env bash
# Make sure Redis (THROTTLE_REDIS_URL) and RabbitMQ (THROTTLE_AMQP_URL) answer on loopback.
#
#   scripts/ensure-services.sh              start what does not answer and leave it running
#   scripts/ensure-services.sh CMD ARGS...  start what does not answer, run CMD, then stop
#                                           exactly what this run started; exit with CMD's status
#
# A server that already answers is used as it is and never stopped. A missing redis-server or
# rabbitmq-server is installed with apt-get when running as root (else a message says how).
# Redis is required. Without RabbitMQ its tests skip, except in CI (CI=true), where this
# script fails instead. Servers started here listen on 127.0.0.1 only, keep no data, and
# live under a temporary directory that is removed when they stop.
set -euo pipefail

REDIS_URL="${THROTTLE_REDIS_URL:-redis://127.0.0.1:6379/0}"
AMQP_URL="${THROTTLE_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672//}"
PY="${THROTTLE_PYTHON:-.venv/bin/python}"
RUN_DIR=""
started=()

say() { echo "ensure-services: $*"; }
fail() { echo "ensure-services: $*" >&2; exit 1; }
in_ci() { case "${CI:-}" in 1|true|TRUE|True|yes) return 0 ;; *) return 1 ;; esac; }

# url_part URL FIELD: host, port, user, password or vhost of a redis:// or amqp:// URL.
url_part() {
    "$PY" - "$1" "$2" <<'PY'
import sys
from urllib.parse import unquote, urlsplit
url, field = urlsplit(sys.argv[1]), sys.argv[2]
default_port = 5672 if url.scheme.startswith("amqp") else 6379
print({"host": url.hostname or "127.0.0.1", "port": url.port or default_port,
       "user": unquote(url.username or "guest"), "password": unquote(url.password or "guest"),
       "vhost": unquote(url.path[1:]) or "/"}[field])
PY
}

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

is_loopback() { case "$1" in 127.0.0.1|localhost|::1) return 0 ;; *) return 1 ;; esac; }

redis_answers() {
    "$PY" - "$REDIS_URL" <<'PY'
import sys, redis
try:
    redis.Redis.from_url(sys.argv[1], socket_timeout=1, socket_connect_timeout=1).ping()
except Exception:
    sys.exit(1)
PY
}

port_answers() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

run_dir() {
    [ -n "$RUN_DIR" ] || RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/throttle-services.XXXXXX")"
    chmod 755 "$RUN_DIR"
}

# apt_install PROGRAM PACKAGE: install PACKAGE when PROGRAM is missing (root with apt-get only).
apt_install() {
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        say "$1 is not installed and this is not root with apt-get: install it" \
            "('sudo apt-get install $2') and run again"
        return 1
    fi
    say "installing $2 with apt-get"
    local log policy="${THROTTLE_POLICY_RC_D:-/usr/sbin/policy-rc.d}" made_policy=""
    log="$(mktemp)"
    if [ ! -e "$policy" ]; then  # keep the package from starting its own system service
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2"; } \
            >"$log" 2>&1; then
        tail -n 5 "$log" >&2
        say "apt-get could not install $2: install it by hand ('apt-get install $2')"
    fi
    [ -z "$made_policy" ] || rm -f "$policy"
    rm -f "$log"
    command -v "$1" >/dev/null 2>&1
}

start_redis() {
    local host port
    host="$(url_part "$REDIS_URL" host)" port="$(url_part "$REDIS_URL" port)"
    is_loopback "$host" || fail "no Redis answers at $REDIS_URL and it is not on loopback;" \
        "start it there or point THROTTLE_REDIS_URL at a running server"
    apt_install redis-server redis-server || fail "no Redis answers at $REDIS_URL; install" \
        "redis-server ('apt-get install redis-server') or point THROTTLE_REDIS_URL at a server"
    run_dir
    say "starting redis-server on 127.0.0.1:$port (no persistence)"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
        --dir "$RUN_DIR" --pidfile "$RUN_DIR/redis.pid" --logfile "$RUN_DIR/redis.log"
    for _ in $(seq 50); do redis_answers && break; sleep 0.1; done
    [ -s "$RUN_DIR/redis.pid" ] && started+=("redis")
    redis_answers || fail "redis-server did not answer at $REDIS_URL: see $RUN_DIR/redis.log"
}

rabbit_node() { echo "throttle-test-$(url_part "$AMQP_URL" port)@localhost"; }

start_rabbitmq() {
    local host port vhost user password node base
    host="$(url_part "$AMQP_URL" host)" port="$(url_part "$AMQP_URL" port)"
    is_loopback "$host" || { say "RabbitMQ at $AMQP_URL does not answer and is not on loopback"; return 1; }
    apt_install rabbitmq-server rabbitmq-server || return 1
    run_dir
    node="$(rabbit_node)" base="$RUN_DIR/rabbitmq"
    mkdir -p "$base" && echo "[]." >"$base/enabled_plugins"
    # Files of its own, so a system-wide /etc/rabbitmq (another node's port or name) is not read.
    echo "listeners.tcp.local = 127.0.0.1:$port" >"$base/rabbitmq.conf"
    echo 'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"' >"$base/rabbitmq-env.conf"
    id -u rabbitmq >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && chown -R rabbitmq: "$base"
    say "starting RabbitMQ node $node on 127.0.0.1:$port"
    epmd -names >/dev/null 2>&1 || touch "$RUN_DIR/epmd-was-down"
    env RABBITMQ_NODENAME="$node" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT="$(free_port)" \
        ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_MNESIA_BASE="$base/mnesia" \
        RABBITMQ_LOG_BASE="$base/log" RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins" \
        RABBITMQ_CONFIG_FILE="$base/rabbitmq.conf" RABBITMQ_CONF_ENV_FILE="$base/rabbitmq-env.conf" \
        rabbitmq-server -detached || true
    started+=("rabbitmq")
    for _ in $(seq 90); do port_answers 127.0.0.1 "$port" && break; sleep 1; done
    port_answers 127.0.0.1 "$port" || { say "RabbitMQ did not answer: see $base/log"; return 1; }
    rabbitmqctl -n "$node" await_startup >/dev/null || return 1
    vhost="$(url_part "$AMQP_URL" vhost)" user="$(url_part "$AMQP_URL" user)"
    password="$(url_part "$AMQP_URL" password)"
    if [ "$user" != guest ]; then
        rabbitmqctl -n "$node" add_user "$user" "$password" >/dev/null || return 1
    fi
    if [ "$vhost" != / ]; then rabbitmqctl -n "$node" add_vhost "$vhost" >/dev/null || return 1; fi
    rabbitmqctl -n "$node" set_permissions -p "$vhost" "$user" ".*" ".*" ".*" >/dev/null
}

stop_started() {
    local what
    for what in "${started[@]}"; do
        case "$what" in
            redis)
                say "stopping the redis-server this run started"
                local pid
                pid="$(cat "$RUN_DIR/redis.pid")"
                kill "$pid" 2>/dev/null || true
                for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done ;;
            rabbitmq)
                say "stopping the RabbitMQ node this run started"
                rabbitmqctl -n "$(rabbit_node)" stop >/dev/null 2>&1 || true
                if [ -e "$RUN_DIR/epmd-was-down" ] && ! epmd -names 2>/dev/null | grep -q '^name'; then
                    epmd -kill >/dev/null 2>&1 || true
                fi ;;
        esac
    done
    started=()
    [ -z "$RUN_DIR" ] || rm -rf "$RUN_DIR"
}

redis_answers || start_redis
say "Redis answers at $REDIS_URL"

rabbit_host="$(url_part "$AMQP_URL" host)" rabbit_port="$(url_part "$AMQP_URL" port)"
if port_answers "$rabbit_host" "$rabbit_port" || start_rabbitmq; then
    say "RabbitMQ answers at $rabbit_host:$rabbit_port"
elif in_ci; then
    stop_started
    fail "CI=true and RabbitMQ does not answer at $rabbit_host:$rabbit_port: install" \
        "rabbitmq-server ('apt-get install rabbitmq-server', as root 'make test' does) or" \
        "point THROTTLE_AMQP_URL at a running server"
else
    say "RabbitMQ does not answer at $rabbit_host:$rabbit_port: its tests will skip"
fi

if [ $# -eq 0 ]; then
    [ ${#started[@]} -eq 0 ] || say "left running: ${started[*]} (data in $RUN_DIR)"
    exit 0
fi
trap stop_started EXIT
trap 'exit 130' INT TERM
status=0
"$@" || status=$?
exit "$status"
