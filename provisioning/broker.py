"""Mosquitto's generated configuration, password and ACL files.

Running the broker is the process harness's job (:mod:`alarmpost_cli.harness`); this module only
writes what it runs.

The ACL gives each post exactly its own topics (by user name, ``%u``), the server-side accounts
(``server``, ``server-*``) all of ``alarmpost/v1/#``, and the ``monitor`` account read access to
``alarmpost/v1/#`` and no write at all. Mosquitto 2.0 refuses a post's publish outside them (PUBACK
0x87 under MQTT 5) and silently filters what it may not read.

Identity: every listener carries ``use_username_as_clientid true``, so a client's id is its user
name whatever id it asks for. A stolen post credential cannot take over the server's or another
post's session (it would only become that post again), and two connections with one credential
(a cloned post) take the one session from each other (MQTT 5 DISCONNECT 0x8E). So each client needs
an account of its own: tools that watch use ``monitor``, tools and extra server instances that
publish as the server side get ``server-1``, ``server-2``, ... (:func:`deployment.add_server_account`).

Transport: with :class:`ListenerTls` the one generated listener speaks TLS only (``cafile``,
``certfile``, ``keyfile``, ``tls_version`` :data:`TLS_MIN_VERSION` or newer); without it, plain TCP
(the deployment refuses that off loopback unless explicitly opened: :func:`deployment.create`).

Size: ``max_packet_size`` (:data:`MAX_PACKET_BYTES`) disconnects a client that sends a bigger packet
("Packet too large", MQTT 5 reason 0x95). It is sized from the protocol's largest legitimate message.
"""

from __future__ import annotations

import getpass
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from protocol.messages import MAX_CALL_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES
from protocol.topics import TOPIC_PREFIX, valid_post_id
from provisioning.credentials import mosquitto_hash

SERVER_USER = "server"
SERVER_USER_PREFIX = "server-"  # further server-side accounts: server-1, server-2, ...
MONITOR_USER = "monitor"  # read-only: benchmarks and tools that watch the traffic
_ACCOUNT_SUFFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,56}$")

# The largest MQTT packet the broker takes from anyone (``max_packet_size``). The largest
# legitimate message either way is a call signal (an SDP offer or answer: MAX_CALL_PAYLOAD_BYTES);
# every other message is at most MAX_PAYLOAD_BYTES. On top of the payload a PUBLISH carries its
# topic (at most ~100 bytes: a 64-character post or team name), a fixed header, a packet id and
# MQTT 5 properties (a few bytes; none set today): 8 KiB covers those with room to spare. A client
# that sends a bigger packet is disconnected, and that includes the server: the server must never
# publish a message bigger than the protocol allows (its codecs bound what it sends to posts).
PACKET_OVERHEAD_BYTES = 8192
MAX_PACKET_BYTES = max(MAX_CALL_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES) + PACKET_OVERHEAD_BYTES

# Written after every listener line: in Mosquitto 2.0 these are per-listener options, which
# ``per_listener_settings false`` does not make global. A listener added by hand needs them too.
LISTENER_OPTIONS = ("use_username_as_clientid true",)

# The oldest TLS version the generated TLS listener accepts (Mosquitto: the minimum).
TLS_MIN_VERSION = "tlsv1.2"


@dataclass(frozen=True)
class ListenerTls:
    """The files of a TLS listener: the CA clients are verified against (and that signed the
    broker's certificate), the broker's certificate and its key."""

    cafile: Path
    certfile: Path
    keyfile: Path

    def lines(self) -> list[str]:
        return [f"cafile {self.cafile.resolve()}", f"certfile {self.certfile.resolve()}",
                f"keyfile {self.keyfile.resolve()}", f"tls_version {TLS_MIN_VERSION}"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_server_user(name: str) -> bool:
    """``server`` or ``server-{suffix}``: an account with the server's ACL."""
    if name == SERVER_USER:
        return True
    suffix = name.removeprefix(SERVER_USER_PREFIX)
    return suffix != name and bool(_ACCOUNT_SUFFIX_RE.match(suffix))


def is_tool_account(name: str) -> bool:
    """An account that is neither a post nor a team: a server-side one or the monitor."""
    return is_server_user(name) or name == MONITOR_USER


def acl_text(server_users: Iterable[str] = (SERVER_USER,),
             monitor_users: Iterable[str] = (MONITOR_USER,)) -> str:
    """The ACL file. Patterns (``%u``) apply to every user, so the monitor is also denied the
    post and team topics named after it: it reads and never writes."""
    post = f"{TOPIC_PREFIX}/post/%u"
    server_blocks: list[str] = []
    for user in sorted(set(server_users)):
        if not is_server_user(user):
            raise ValueError(f"invalid server-side account name {user!r}")
        server_blocks += [f"user {user}", f"topic readwrite {TOPIC_PREFIX}/#", ""]
    monitor_blocks: list[str] = []
    for user in sorted(set(monitor_users)):
        monitor_blocks += [
            f"user {user}",
            f"topic deny {TOPIC_PREFIX}/post/{user}/#",
            f"topic deny {TOPIC_PREFIX}/team/{user}/#",
            f"topic read {TOPIC_PREFIX}/#",
            "",
        ]
    return "\n".join(
        [
            "# Generated by alarmpost. The server side sees everything; the monitor reads",
            "# everything and writes nothing; each post and team only its own topics.",
            *server_blocks,
            *monitor_blocks,
            f"pattern write {post}/event",
            f"pattern write {post}/heartbeat",
            f"pattern readwrite {post}/status",  # read: a post sees a clone announce itself
            f"pattern write {post}/cmdresult",
            f"pattern write {post}/callstate",
            f"pattern read {post}/ack",
            f"pattern read {post}/cmd",
            f"pattern read {post}/call",
            f"pattern read {TOPIC_PREFIX}/server/status",
            "",
            "# Patrol teams: the user name is team-{id}, and %u is the whole user name.",
            f"pattern read {TOPIC_PREFIX}/team/%u/page",
            f"pattern read {TOPIC_PREFIX}/team/%u/withdrawn",
            f"pattern write {TOPIC_PREFIX}/team/%u/answer",
            f"pattern write {TOPIC_PREFIX}/team/%u/position",
            f"pattern write {TOPIC_PREFIX}/team/%u/status",
            "",
        ]
    )


def password_file_text(accounts: Mapping[str, str]) -> str:
    """Lines ``user:$7$...`` for ``{user: clear password}``."""
    lines = []
    for user, password in sorted(accounts.items()):
        if not is_tool_account(user) and not valid_post_id(user):
            raise ValueError(f"invalid account name {user!r}")
        lines.append(f"{user}:{mosquitto_hash(password)}")
    return "\n".join(lines) + "\n"


def write_password_file(path: Path, accounts: Mapping[str, str]) -> None:
    path.write_text(password_file_text(accounts))
    path.chmod(0o600)


def config_text(
    *,
    port: int,
    directory: Path,
    host: str = "127.0.0.1",
    autosave_interval: int = 1,
    extra_listeners: Iterable[str] = (),
    tls: ListenerTls | None = None,
) -> str:
    """``tls``: make the generated listener a TLS one (no plain TCP at all).
    ``extra_listeners``: lines after the generated listener; every further ``listener`` line
    among them is followed by :data:`LISTENER_OPTIONS`, as the generated one is."""
    directory = directory.resolve()
    extra: list[str] = []
    for line in extra_listeners:
        extra.append(line)
        if line.split(maxsplit=1)[:1] == ["listener"]:
            extra.extend(LISTENER_OPTIONS)
    extra_listeners = extra
    lines = [
        "# Generated by alarmpost.",
        f"user {getpass.getuser()}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {directory / 'passwd'}",
        f"acl_file {directory / 'acl'}",
        "persistence true",
        f"persistence_location {directory / 'data'}/",
        # Queued QoS 1 messages survive SIGKILL only up to the last save: save often.
        f"autosave_interval {autosave_interval}",
        "persistent_client_expiration 14d",
        "max_queued_messages 100000",
        "max_inflight_messages 100",
        "set_tcp_nodelay true",
        # Global: one packet bigger than the protocol's largest message disconnects its sender.
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"log_dest file {directory / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        f"listener {port} {host}",
        *LISTENER_OPTIONS,
        *(tls.lines() if tls is not None else []),
        *extra_listeners,
        "",
    ]
    return "\n".join(lines)


def password_file_users(path: Path) -> list[str]:
    """The user names in a password file."""
    return [line.split(":", 1)[0] for line in path.read_text().splitlines() if line.strip()]


def write_acl(directory: Path) -> None:
    """(Re)write ``acl`` for the accounts in ``passwd``: a block per server-side and monitor one."""
    users = password_file_users(directory / "passwd")
    (directory / "acl").write_text(acl_text(
        server_users=[u for u in users if is_server_user(u)] or [SERVER_USER],
        monitor_users=[u for u in users if u == MONITOR_USER],
    ))


def write_broker_dir(
    directory: Path, *, port: int, accounts: Mapping[str, str], host: str = "127.0.0.1",
    tls: ListenerTls | None = None,
) -> Path:
    """Write ``mosquitto.conf``, ``passwd`` and ``acl`` into ``directory``; return the config.
    With ``tls`` the one listener speaks TLS only."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir(exist_ok=True)
    write_password_file(directory / "passwd", accounts)
    write_acl(directory)
    conf = directory / "mosquitto.conf"
    conf.write_text(config_text(port=port, directory=directory, host=host, tls=tls))
    return conf
