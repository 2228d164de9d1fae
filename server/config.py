"""Server configuration (TOML; environment overrides ``ALARMPOST_SERVER_{SECTION}_{KEY}``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mqttlink import MqttSettings
from protocol.settings import ConfigError, load, resolve

SERVER_USER = "server"
SERVER_CLIENT_ID = "alarmpost-server"


@dataclass
class DatabaseSection:
    backend: str = "sqlite"  # "sqlite" (embedded, one server) or "postgresql"
    path: str = "alarmpost.db"  # sqlite: the database file
    # sqlite: FULL, so a committed (and so acknowledged) event survives a power cut, not only a
    # crash. (PostgreSQL runs every connection with synchronous_commit = on.)
    synchronous: str = "FULL"
    dsn: str = ""  # postgresql: e.g. "postgresql://alarmpost@db.example:5432/alarmpost"
    pool_size: int = 4  # postgresql: connections at most
    connect_timeout_s: float = 5.0  # postgresql: to connect, or to wait for a free connection
    statement_timeout_s: float = 5.0  # postgresql: a statement running longer is cancelled


@dataclass
class HttpSection:
    host: str = "127.0.0.1"
    port: int = 8080
    api_token: str = ""  # required: every endpoint wants "Authorization: Bearer <token>"
    read_timeout_s: float = 10.0  # a request's headers, then its body, must arrive within this


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
class DispatchSection:
    enabled: bool = True  # page patrol teams automatically when an alarm opens an incident
    answer_timeout_s: float = 30.0  # a page unanswered this long goes to the next team
    direct_pages: int = 3  # K: after this many unanswered direct pages, broadcast
    broadcast_radius_km: float = 10.0  # the broadcast goes to every available team this close
    zone_margin_km: float = 1.0  # a team whose zone holds the post wins if not this much farther
    speed_kmh: float = 30.0  # for the ETA shown with a page (the ranking is by distance)
    position_max_age_s: float = 120.0  # an older position counts as unknown
    max_clock_skew_s: float = 30.0  # a position/answer stamped further in the future is refused
    page_test_events: bool = False  # page teams for commissioning test presses too


@dataclass
class ConsoleSection:
    """The operators' web console (server.console) and the video intercom."""

    session_ttl_s: float = 12 * 3600.0  # a console login lasts this long
    secure_cookies: bool = False  # force "Secure" cookies (behind a TLS proxy); automatic on HTTPS
    tls_cert_file: str = ""  # serve HTTP over TLS (needed for a console reached by a LAN address)
    tls_key_file: str = ""
    login_attempts: int = 5  # failed (or unfinished) logins allowed per address...
    login_window_s: float = 60.0  # ...within this window, then 429 until it slides
    login_delay_s: float = 0.5  # a name with recent failures: its next check waits this long,
    login_max_delay_s: float = 8.0  # doubling with each failure up to this (never a lockout)
    command_timeout_s: float = 10.0  # a command not confirmed by the post by then is timed out
    call_timeout_s: float = 10.0  # a post that does not answer a call offer by then: failed
    ice_servers: list[str] = field(default_factory=list)  # STUN/TURN URLs for browsers; none on a LAN
    ice_username: str = ""  # for turn: URLs
    ice_password: str = ""
    tile_url: str = ""  # optional map tiles, e.g. "http://tiles.local/{z}/{x}/{y}.png"


@dataclass
class PatrolAppSection:
    """The patrol teams' mobile web app at /patrol (server.web.patrol); logins are rate-limited
    and cookies made Secure by the [console] settings."""

    session_ttl_s: float = 24 * 3600.0  # a team's login on its phone lasts this long
    # Optional "open in a map" link besides the geo: URI, e.g. a map server on the LAN:
    # "http://maps.local/?mlat={lat}&mlon={lon}#map=17/{lat}/{lon}" ({lat} {lon} {name} filled in)
    map_url: str = ""


@dataclass
class ServerConfig:
    # [mqtt]: mqttlink.MqttSettings. username defaults to "server" and client_id to
    # "alarmpost-server". A broker with use_username_as_clientid (the generated one) makes every
    # client's id its user name, so the server's persistent session is kept under ``username``:
    # each server instance needs its own account (server, server-1, ...).
    mqtt: MqttSettings = field(default_factory=lambda: MqttSettings(
        username=SERVER_USER, client_id=SERVER_CLIENT_ID))
    database: DatabaseSection = field(default_factory=DatabaseSection)
    http: HttpSection = field(default_factory=HttpSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    supervision: SupervisionSection = field(default_factory=SupervisionSection)
    incidents: IncidentsSection = field(default_factory=IncidentsSection)
    dispatch: DispatchSection = field(default_factory=DispatchSection)
    console: ConsoleSection = field(default_factory=ConsoleSection)
    patrol_app: PatrolAppSection = field(default_factory=PatrolAppSection)
    source: Path | None = None

    def validate(self) -> None:
        self.mqtt = dataclasses.replace(self.mqtt, username=self.mqtt.username or SERVER_USER,
                                        client_id=self.mqtt.client_id or SERVER_CLIENT_ID)
        if not self.http.api_token:
            raise ConfigError(
                "[http] api_token is empty: every HTTP endpoint needs a token. Set one in the "
                "config or in $ALARMPOST_SERVER_HTTP_API_TOKEN (`alarmpost provision init` "
                "generates one)"
            )
        db = self.database
        if db.backend not in ("sqlite", "postgresql"):
            raise ConfigError(f"[database] backend must be \"sqlite\" or \"postgresql\", "
                              f"not {db.backend!r}")
        if db.synchronous.upper() not in {"FULL", "NORMAL", "EXTRA"}:
            raise ConfigError("[database] synchronous must be FULL, EXTRA or NORMAL")
        if db.backend == "postgresql" and not db.dsn:
            raise ConfigError("[database] backend = \"postgresql\" needs dsn, e.g. "
                              "\"postgresql://alarmpost@db.example:5432/alarmpost\" (or "
                              "$ALARMPOST_SERVER_DATABASE_DSN)")
        if db.pool_size < 1 or db.connect_timeout_s <= 0 or db.statement_timeout_s <= 0:
            raise ConfigError("[database] pool_size must be >= 1, connect_timeout_s and "
                              "statement_timeout_s > 0")
        if self.http.read_timeout_s <= 0:
            raise ConfigError("[http] read_timeout_s must be > 0")
        c = self.console
        if c.login_attempts < 1 or c.login_window_s <= 0 or c.login_delay_s < 0 \
                or c.login_max_delay_s < c.login_delay_s:
            raise ConfigError(
                "[console] login_attempts must be >= 1, login_window_s > 0, login_delay_s >= 0 "
                "and login_max_delay_s >= login_delay_s"
            )
        d = self.dispatch
        if d.answer_timeout_s <= 0 or d.direct_pages < 0 or d.broadcast_radius_km < 0 \
                or d.zone_margin_km < 0 or d.speed_kmh <= 0 or d.position_max_age_s <= 0:
            raise ConfigError(
                "[dispatch] answer_timeout_s, speed_kmh and position_max_age_s must be > 0; "
                "direct_pages, broadcast_radius_km and zone_margin_km must be >= 0"
            )


def load_server_config(path: Path | str | None) -> ServerConfig:
    config = load(ServerConfig, path, "ALARMPOST_SERVER")
    config.source = Path(path) if path is not None else None
    config.database.path = str(resolve(config.source, config.database.path))
    config.registry.posts_file = str(resolve(config.source, config.registry.posts_file))
    # TLS files, like every path in the file, are relative to the config file.
    config.mqtt = config.mqtt.relative_to(config.source)
    return config
