#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers, starting one if needed.
#
# Order: the broker at $DOMAIN_EVENT_BROKER (or localhost:5672) if it answers;
# else `docker compose up -d --wait` where Docker runs containers; else a
# local rabbitmq-server (installed with apt-get when root on Debian/Ubuntu);
# else one message saying how to get a broker.
set -euo pipefail

PYTHON=${PYTHON:-python3}
here="$(cd "$(dirname "$0")" && pwd)"

answers() {
    "$PYTHON" "$here/broker_answers.py"
}

wait_for_broker() {
    for _ in $(seq 1 90); do
        if answers; then return 0; fi
        sleep 1
    done
    return 1
}

if answers; then
    exit 0
fi

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    echo "ensure-broker: no broker answers; starting one with docker compose" >&2
    if docker compose -f "$here/../docker-compose.yml" up -d --wait && wait_for_broker; then
        exit 0
    fi
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
        && grep -qiE 'debian|ubuntu' /etc/os-release 2>/dev/null; then
        echo "ensure-broker: installing rabbitmq-server with apt-get" >&2
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server >&2
    fi
fi

if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "ensure-broker: no broker answers; starting the local rabbitmq-server" >&2
    rabbitmq-server -detached >&2 || true
    if wait_for_broker; then
        exit 0
    fi
fi

cat >&2 <<'MSG'
ensure-broker: no RabbitMQ broker answers at ${DOMAIN_EVENT_BROKER:-amqp://guest:guest@localhost:5672/%2F}
and none could be started. Start one with `docker compose up -d --wait`
(see docker-compose.yml), install RabbitMQ (https://www.rabbitmq.com/download.html),
or point DOMAIN_EVENT_BROKER at a broker you have.
MSG
exit 1
