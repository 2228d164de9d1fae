"""Why a connection attempt failed or a connection ended: one type per kind of cause.

An owner tells them apart with ``isinstance``; each keeps the original exception as
``__cause__``. None of them is ever raised out of :meth:`mqttlink.MqttLink.run`: the link reports
them through its state listeners (with the state ``BACKING_OFF``) and tries again.
"""

from __future__ import annotations

# CONNACK reason codes that mean "these credentials are not let in": MQTT 5 (Bad user name or
# password, Not authorized, Banned, Bad authentication method) and MQTT 3.1.1 (4, 5).
NOT_AUTHORISED_CODES = frozenset({0x86, 0x87, 0x8A, 0x8C, 4, 5})
# MQTT 5 DISCONNECT reason "Session taken over": another client connected with this client id.
SESSION_TAKEN_OVER = 0x8E


class LinkError(Exception):
    """Base of every reason the link gives for being without a connection."""


class ConnectFailed(LinkError):
    """No answer from the broker: the address cannot be reached, TCP or TLS failed, or no
    CONNACK came within the link's timeout."""


class ConnectRefused(LinkError):
    """The broker answered CONNACK with a failure (other than the credentials: a bad client
    id, the server unavailable or busy, a quota...)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"the broker refused the connection: {reason} (0x{code:02x})")
        self.code = code
        self.reason = reason


class NotAuthorised(ConnectRefused):
    """CONNACK refused the credentials (bad user name or password, not authorised, banned)."""


class ConnectionDropped(LinkError):
    """An established connection was lost: the broker closed it or sent DISCONNECT, the
    network failed, a keepalive went unanswered, or an MQTT operation of the owner failed."""

    def __init__(self, message: str, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code

    @property
    def taken_over(self) -> bool:
        """The broker said another client took this session (DISCONNECT 0x8E): a second device
        with the same client id, i.e. (with use_username_as_clientid) the same credential."""
        return self.reason_code == SESSION_TAKEN_OVER


class HandlerFault(LinkError):
    """The owner's ``on_connected`` raised something other than an MQTT error: a bug of ours.
    The original exception is ``__cause__`` (and :attr:`error`)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"the connection's handler failed: {type(error).__name__}: "
                         f"{str(error)[:200]}")
        self.error = error
