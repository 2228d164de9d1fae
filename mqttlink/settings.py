"""The one MQTT connection settings type, shared by the edge agent, the server and the simulated
patrol teams.

Each program keeps its ``[mqtt]`` section under the same keys it always had; missing keys take
the defaults below, and a program fills in what only it knows (a post's user name is its id, a
team's is ``team-{id}``) with :func:`dataclasses.replace`. Loaded either as a section of a
program's configuration (:func:`protocol.settings.load` builds it from the TOML file and the
environment) or from a plain mapping with :meth:`MqttSettings.from_section`. Both check every
value here and raise :class:`~protocol.settings.ConfigError` naming the key to fix.

The password is left out of ``repr()`` (and so of every log line that shows the settings).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.settings import ConfigError, resolve

# MQTT 5 limits: Keep Alive is a two-byte integer, Session Expiry Interval a four-byte one
# (0xFFFFFFFF: the session never expires).
MAX_KEEPALIVE_S = 0xFFFF
MAX_SESSION_EXPIRY_S = 0xFFFFFFFF


@dataclass(frozen=True)
class MqttSettings:
    """Where and as whom to connect, and how long the broker keeps the session."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""  # each program fills in its own default (post id, "server", team-{id})
    password: str = field(default="", repr=False)
    # The client id asked for; "" means the user name. A broker with use_username_as_clientid
    # (the generated one) makes every client's id its user name whatever is asked for.
    client_id: str = ""
    keepalive_s: int = 15
    # How long the broker keeps the session (subscriptions, queued QoS 1 messages) while the
    # client is away. With clean_start false a reconnect resumes it.
    session_expiry_s: int = 7 * 24 * 3600
    clean_start: bool = False  # true drops the session (and what was queued) on every connect
    tls_ca_file: str = ""  # set to use TLS to the broker
    tls_cert_file: str = ""  # client certificate, for a broker with require_certificate
    tls_key_file: str = ""  # its key, when not in the certificate file

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "[mqtt]") -> None:
        """Raise :class:`ConfigError` naming the first key whose value cannot be used."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = _TYPES[f.name]
            if type(value) is not expected:
                raise ConfigError(f"{where} {f.name}: expected {_WORDS[expected]}, got {value!r}")
        if not self.host.strip():
            raise ConfigError(f"{where} host is empty: name the broker's address")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"{where} port must be between 1 and 65535, got {self.port}")
        if not 1 <= self.keepalive_s <= MAX_KEEPALIVE_S:
            raise ConfigError(
                f"{where} keepalive_s must be between 1 and {MAX_KEEPALIVE_S}, got {self.keepalive_s}"
            )
        if not 0 <= self.session_expiry_s <= MAX_SESSION_EXPIRY_S:
            raise ConfigError(f"{where} session_expiry_s must be between 0 and "
                              f"{MAX_SESSION_EXPIRY_S}, got {self.session_expiry_s}")
        if self.tls_cert_file and not self.tls_ca_file:
            raise ConfigError(f"{where} tls_cert_file is set but tls_ca_file is not: TLS needs the "
                              "broker's CA certificate (tls_ca_file)")
        if self.tls_key_file and not self.tls_cert_file:
            raise ConfigError(f"{where} tls_key_file is set but tls_cert_file is not")

    @classmethod
    def from_section(cls, section: Mapping[str, Any], *, where: str = "[mqtt]",
                     defaults: Mapping[str, Any] | None = None) -> MqttSettings:
        """Settings from a parsed ``[mqtt]`` table. ``defaults`` replace the class defaults for
        keys the table leaves out (e.g. ``{"username": "server"}``). Unknown keys and values of
        the wrong type are refused with the key's name."""
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where} must be a table, got {section!r}")
        known = set(_TYPES)
        unknown = sorted(str(k) for k in set(section) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
        merged = {**(defaults or {}), **section}
        bad_default = sorted(set(merged) - known)
        if bad_default:
            raise ConfigError(f"unknown default key(s) {bad_default} for {where}")
        values = {key: _coerce(value, _TYPES[key], f"{where} {key}") for key, value in merged.items()}
        settings = cls(**values)
        settings.check(where)
        return settings

    @property
    def identifier(self) -> str:
        """The client id to ask the broker for: ``client_id``, else the user name."""
        return self.client_id or self.username

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca_file)

    def relative_to(self, config_file: Path | str | None) -> MqttSettings:
        """These settings with the TLS files found relative to ``config_file``, like every
        path in a config file (absolute ones, and settings made in code, stay as they are)."""
        def file(value: str) -> str:
            return str(resolve(config_file, value)) if value else ""

        return dataclasses.replace(self, tls_ca_file=file(self.tls_ca_file),
                                   tls_cert_file=file(self.tls_cert_file),
                                   tls_key_file=file(self.tls_key_file))

    def tls_context(self) -> ssl.SSLContext | None:
        """A TLS context for the broker connection, or None for plain TCP. Reads the files, so
        an unreadable certificate raises ``OSError``/``ssl.SSLError`` here."""
        if not self.tls_ca_file:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca_file)
        if self.tls_cert_file:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file or None)
        return context

    def describe(self) -> str:
        """``user@host:port`` for log lines (never the password)."""
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.username or '(anonymous)'}@{self.host}:{self.port}"


_TYPES: dict[str, type] = {
    "host": str, "port": int, "username": str, "password": str, "client_id": str,
    "keepalive_s": int, "session_expiry_s": int, "clean_start": bool, "tls_ca_file": str,
    "tls_cert_file": str, "tls_key_file": str,
}
_WORDS = {str: "a string", int: "an integer", bool: "true or false"}


def _coerce(value: Any, typ: type, where: str) -> Any:
    """What TOML or an environment variable gives, as ``typ``; nothing is guessed: "10" is an
    integer but 10.5 and true are not."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # a port-like host or a numeric user name written without quotes
    raise ConfigError(f"{where}: expected a string, got {value!r}")


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}
