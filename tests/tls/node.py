"""A RabbitMQ node with a TLS listener, started beside the shared test broker.

Its own node name, ports, data, logs, configuration, enabled-plugins file and
Erlang cookie, all under one temporary directory: the default node (5672) and
its files are left alone.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .certs import CLIENT_CN, Certificates

#: Node name; the host part is this machine's short host name.
NODE_PREFIX = "deb-tls"
#: Plain AMQP port of the TLS node (for the "plain port behind amqps://" test).
AMQP_PORT = 5701
#: TLS port.
TLS_PORT = 5702
#: Erlang distribution port.
DIST_PORT = 25702

BOOT_TIMEOUT = 90.0


def _script(name: str) -> str | None:
    """The real RabbitMQ script (not Debian's ``su`` wrapper in /usr/sbin)."""
    for directory in (os.environ.get("DEB_TEST_RABBITMQ_BIN"), "/usr/lib/rabbitmq/bin"):
        if directory and (Path(directory) / name).is_file():
            return str(Path(directory) / name)
    return shutil.which(name)


def rabbitmq_available() -> bool:
    return _script("rabbitmq-server") is not None and _script("rabbitmqctl") is not None


@dataclass
class TLSNode:
    """A running TLS node."""

    name: str
    directory: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n <node> args``; return its output."""
        ctl = _script("rabbitmqctl")
        assert ctl is not None
        result = subprocess.run(
            [ctl, "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    def log_tail(self, lines: int = 40) -> str:
        text = []
        for path in sorted((self.directory / "log").glob("*.log")):
            text.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(text)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.ctl("stop", timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _config(certs: Certificates) -> str:
    return f"""\
listeners.tcp.1 = 127.0.0.1:{AMQP_PORT}
listeners.ssl.1 = 127.0.0.1:{TLS_PORT}
ssl_options.cacertfile = {certs.ca}
ssl_options.certfile = {certs.server.cert}
ssl_options.keyfile = {certs.server.key}
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
ssl_cert_login_from = common_name
loopback_users = none
log.console = false
log.file.level = info
"""


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_node(certs: Certificates, directory: Path) -> TLSNode:
    """Start the TLS node and create the EXTERNAL user; raise when it does not come up."""
    server = _script("rabbitmq-server")
    assert server is not None
    for port in (AMQP_PORT, TLS_PORT, DIST_PORT):
        if _port_open(port):
            raise RuntimeError(f"port {port} is already in use: another TLS test node is running?")
    home = directory / "home"
    for sub in ("home", "mnesia", "log"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(20))
    cookie.chmod(0o400)
    (directory / "rabbitmq.conf").write_text(_config(certs))
    (directory / "enabled_plugins").write_text("[rabbitmq_auth_mechanism_ssl].\n")
    (directory / "rabbitmq-env.conf").write_text("")
    name = f"{NODE_PREFIX}@{socket.gethostname().split('.')[0]}"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RABBITMQ_", "ERL_")) and key != "HOME"
    }
    env.update(
        HOME=str(home),
        RABBITMQ_NODENAME=name,
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_DIST_PORT=str(DIST_PORT),
        RABBITMQ_MNESIA_BASE=str(directory / "mnesia"),
        RABBITMQ_LOG_BASE=str(directory / "log"),
        RABBITMQ_CONFIG_FILE=str(directory / "rabbitmq.conf"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(directory / "enabled_plugins"),
        RABBITMQ_CONF_ENV_FILE=str(directory / "rabbitmq-env.conf"),
        RABBITMQ_PID_FILE=str(directory / "node.pid"),
        ERL_EPMD_ADDRESS="127.0.0.1",
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
    )
    with (directory / "server.out").open("wb") as output:
        process = subprocess.Popen(
            [server],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=directory,
            start_new_session=True,  # not stopped by a Ctrl-C meant for pytest: stop() does it
        )
    node = TLSNode(name=name, directory=directory, env=env, process=process)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not _port_open(TLS_PORT):
        if process.poll() is not None or time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(
                f"the TLS test node {name} did not start:\n"
                f"{(directory / 'server.out').read_text(errors='replace')[-3000:]}\n"
                f"{node.log_tail()}"
            )
        time.sleep(0.2)
    try:
        # The TLS listener opens last in the boot: no await_startup needed. The
        # password is never used (EXTERNAL login) and never shown.
        node.ctl("add_user", CLIENT_CN, secrets.token_hex(16))
        node.ctl("set_permissions", CLIENT_CN, ".*", ".*", ".*")
    except BaseException:
        node.stop()
        raise
    return node
