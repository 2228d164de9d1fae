"""Server configuration (TOML; environment overrides ``ALARMPOST_SERVER_{SECTION}_{KEY}``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from protocol.settings import ConfigError, load, resolve


@dataclass
class MqttSection:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = "server"
    password: str = ""
    client_id: str = "alarmpost-server"
    session_expiry_s: int = 7 * 24 * 3600
    keepalive_s: int = 15
    tls_ca_file: str = ""  # set to use TLS to the broker
    tls_cert_file: str = ""  # client certificate, for a broker with require_certificate
    tls_key_file: str = ""


@dataclass
class DatabaseSection:
    path: str = "alarmpost.db"
    # FULL: a committed (and so acknowledged) event survives a power cut, not only a crash.
    synchronous: str = "FULL"


@dataclass
class HttpSection:
    host: str = "127.0.0.1"
    port: int = 8080
    api_token: str = ""  # required: every endpoint wants "Authorization: Bearer <token>"


@dataclass
class RegistrySection:
    posts_file: str = "posts.toml"


@dataclass
class SupervisionSection:
    grace_intervals: float = 2.5  # a post silent this many heartbeat intervals is offline
    default_heartbeat_s: float = 10.0  # until a post's own heartbeat says otherwise
    flush_s: float = 5.0  # how often live post state is written to the database


@dataclass
class IncidentsSection:
    # Resolve an incident by itself this long after its last event; 0 = never (operators resolve).
    auto_resolve_s: float = 0.0


@dataclass
class ServerConfig:
    mqtt: MqttSection = field(default_factory=MqttSection)
    database: DatabaseSection = field(default_factory=DatabaseSection)
    http: HttpSection = field(default_factory=HttpSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    supervision: SupervisionSection = field(default_factory=SupervisionSection)
    incidents: IncidentsSection = field(default_factory=IncidentsSection)
    source: Path | None = None

    def validate(self) -> None:
        if not self.http.api_token:
            raise ConfigError(
                "[http] api_token is empty: every HTTP endpoint needs a token. Set one in the "
                "config or in $ALARMPOST_SERVER_HTTP_API_TOKEN (`alarmpost provision init` "
                "generates one)"
            )
        if self.database.synchronous.upper() not in {"FULL", "NORMAL", "EXTRA"}:
            raise ConfigError("[database] synchronous must be FULL, EXTRA or NORMAL")


def load_server_config(path: Path | str | None) -> ServerConfig:
    config = load(ServerConfig, path, "ALARMPOST_SERVER")
    config.source = Path(path) if path is not None else None
    config.database.path = str(resolve(config.source, config.database.path))
    config.registry.posts_file = str(resolve(config.source, config.registry.posts_file))
    return config
