"""Exit 0 when an AMQP broker answers at $DOMAIN_EVENT_BROKER (or localhost).

Uses only the standard library: it runs before any virtualenv exists.
"""

import os
import socket
import sys
import urllib.parse

url = os.environ.get("DOMAIN_EVENT_BROKER", "").replace(",", " ").split()
target = urllib.parse.urlsplit(url[0] if url else "amqp://localhost:5672/")
port = target.port or (5671 if target.scheme == "amqps" else 5672)
try:
    with socket.create_connection((target.hostname or "localhost", port), timeout=2) as sock:
        if target.scheme == "amqps":
            sys.exit(0)  # a TLS listener answered; the handshake is pika's job
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        reply = sock.recv(8)
except OSError:
    sys.exit(1)
# A broker answers the protocol header with a Connection.Start method frame.
sys.exit(0 if reply[:1] == b"\x01" else 1)
