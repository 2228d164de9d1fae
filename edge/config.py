"""Edge agent configuration (TOML; environment overrides ``ALARMPOST_EDGE_{SECTION}_{KEY}``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mqttlink import MqttSettings
from protocol.settings import ConfigError, load, resolve
from protocol.topics import valid_post_id


@dataclass
class PostSection:
    id: str = ""
    name: str = ""
    silent: bool = False  # a silent alarm: no strobe, no siren, everything else the same


@dataclass
class HardwareSection:
    # "gpio" (gpiozero's default pin factory), "mock" (gpiozero's MockFactory) or "ioboard" (a
    # serial IO board, see [ioboard]; the *_pin, hold_ms and debounce_ms keys are then unused:
    # the board guards its button itself)
    backend: str = "gpio"
    button_pin: int = 17
    strobe_pin: int = 27
    siren_pin: int = 22
    help_pin: int = 23
    hold_ms: int = 80  # the button must stay down this long to count (guards against brushes)
    debounce_ms: int = 30  # the button must stay up this long before it can count again
    siren_max_s: float = 180.0  # the siren switches itself off after this; the strobe stays on


@dataclass
class IoBoardSection:
    """A serial IO board (``[hardware] backend = "ioboard"``; protocol in docs/serial.md)."""

    device: str = "/dev/ttyUSB0"  # the serial device (or a stable symlink to it)
    baud: int = 115200
    framing: str = "8N1"  # data bits, parity (N/E/O), stop bits
    ack_timeout_ms: float = 50.0  # first resend of an unacknowledged frame after this
    resend_max_ms: float = 1000.0  # resend backoff ceiling; frames are resent until acknowledged
    fault_after: int = 8  # sends of one frame without an ACK before the link is a fault
    silence_s: float = 5.0  # no frame from the board this long (it sends status every second): fault
    reopen_max_s: float = 5.0  # a lost device is reopened with backoff up to this
    battery_low_mv: int = 11500  # below: fault battery_low (cleared 200 mV above)


    def validate(self) -> None:
        if not self.device:
            raise ConfigError("[ioboard] device is required (e.g. \"/dev/ttyUSB0\")")
        if self.baud not in BAUD_RATES:
            raise ConfigError(f"[ioboard] baud must be one of {', '.join(map(str, BAUD_RATES))}")
        if (len(self.framing) != 3 or self.framing[0] not in "5678"
                or self.framing[1] not in "NEO" or self.framing[2] not in "12"):
            raise ConfigError("[ioboard] framing must be data bits, parity, stop bits, e.g. \"8N1\"")
        if min(self.ack_timeout_ms, self.resend_max_ms, self.silence_s, self.reopen_max_s) <= 0:
            raise ConfigError("[ioboard] timeouts must be positive")
        if self.fault_after < 1:
            raise ConfigError("[ioboard] fault_after must be at least 1")


BAUD_RATES = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)


@dataclass
class TimingSection:
    heartbeat_s: float = 10.0
    ack_timeout_s: float = 2.0  # first resend after this without the server's ACK
    resend_max_s: float = 30.0  # backoff ceiling; unacknowledged events are resent forever
    reconnect_max_s: float = 10.0


@dataclass
class OutboxSection:
    path: str = "outbox.db"
    retry_s: float = 5.0  # while the outbox cannot be opened or written, try it again this often


@dataclass
class MediaSection:
    """The video intercom (edge.media, loaded only when the post rings)."""

    camera: str = ""  # OpenCV device index ("0") or path/URL; "" = a moving test pattern
    width: int = 640
    height: int = 480
    fps: float = 15.0
    ice_servers: list[str] = field(default_factory=list)  # STUN/TURN URLs; none on a LAN
    ice_username: str = ""
    ice_password: str = ""


@dataclass
class EdgeConfig:
    post: PostSection = field(default_factory=PostSection)
    # [mqtt]: mqttlink.MqttSettings. username defaults to the post id (the broker's ACL is keyed
    # on it), client_id to "post-{id}" (a broker with use_username_as_clientid uses the user name).
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    hardware: HardwareSection = field(default_factory=HardwareSection)
    ioboard: IoBoardSection = field(default_factory=IoBoardSection)
    timing: TimingSection = field(default_factory=TimingSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    media: MediaSection = field(default_factory=MediaSection)
    source: Path | None = None

    def validate(self) -> None:
        if not self.post.id:
            raise ConfigError("[post] id is required (the post's identity, e.g. \"P001\")")
        if not valid_post_id(self.post.id):
            raise ConfigError(
                f"[post] id {self.post.id!r} is invalid: use 1-64 letters, digits, '-' or '_'"
            )
        self.mqtt = dataclasses.replace(self.mqtt, username=self.mqtt.username or self.post.id,
                                        client_id=self.mqtt.client_id or f"post-{self.post.id}")
        if self.hardware.backend not in {"gpio", "mock", "ioboard"}:
            raise ConfigError("[hardware] backend must be \"gpio\", \"mock\" or \"ioboard\"")
        if self.hardware.backend == "ioboard":
            self.ioboard.validate()
        if self.timing.heartbeat_s <= 0 or self.timing.ack_timeout_s <= 0 or self.outbox.retry_s <= 0:
            raise ConfigError("[timing] intervals and [outbox] retry_s must be positive")

    @property
    def outbox_path(self) -> Path:
        return resolve(self.source, self.outbox.path)


def load_edge_config(path: Path | str | None) -> EdgeConfig:
    config = load(EdgeConfig, path, "ALARMPOST_EDGE")
    config.source = Path(path) if path is not None else None
    if config.source is not None:
        config.outbox.path = str(config.outbox_path)
    config.mqtt = config.mqtt.relative_to(config.source)  # TLS files beside the config
    return config
