#!/usr/bin/env bash
# Make sure the servers the tests need answer on loopback; start them when they do not.
# Redis is required; RabbitMQ is started when installed (its tests skip without it).
set -euo pipefail
URL="${THROTTLE_REDIS_URL:-redis://127.0.0.1:6379/0}"
PY=".venv/bin/python"

redis_answers() {
    "$PY" - "$URL" <<'PY'
import sys, redis
try:
    redis.Redis.from_url(sys.argv[1], socket_timeout=1, socket_connect_timeout=1).ping()
except Exception:
    sys.exit(1)
PY
}

if ! redis_answers; then
    if command -v redis-server >/dev/null; then
        echo "Redis does not answer at $URL; starting redis-server on 127.0.0.1:6379 (no persistence)"
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
        for _ in $(seq 50); do redis_answers && break; sleep 0.1; done
    fi
    if ! redis_answers; then
        echo "No Redis answers at $URL. Install one (e.g. 'apt-get install redis-server')" >&2
        echo "or point THROTTLE_REDIS_URL at a running server, then run 'make test' again." >&2
        exit 1
    fi
fi
echo "Redis answers at $URL"

rabbit_answers() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! rabbit_answers && command -v rabbitmq-server >/dev/null; then
    echo "RabbitMQ does not answer on 127.0.0.1:5672; starting it"
    rabbitmq-server -detached || true
    for _ in $(seq 60); do rabbit_answers && break; sleep 1; done
fi
if rabbit_answers; then echo "RabbitMQ answers on 127.0.0.1:5672"; else echo "RabbitMQ not available: its tests will skip"; fi
