"""aiomqtt's client with what it hides from us: the CONNACK session-present flag, the reason of
a DISCONNECT the broker sent, and PUBACK failure codes.

aiomqtt 2.x (pinned ``<3``) turns the broker's DISCONNECT into a bare ``MqttCodeError`` and drops
the PUBACK reason code and the CONNACK flags. paho hands them to these callbacks first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiomqtt


class LinkClient(aiomqtt.Client):
    """One connection attempt's client (aiomqtt clients are not reconnected: a new one each)."""

    def __init__(self, *args: Any, on_publish_refused: Callable[[int], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session_present = False
        self.disconnect_reason: int | None = None  # the broker's DISCONNECT reason, if it sent one
        self._on_publish_refused = on_publish_refused

    @property
    def dropped(self) -> asyncio.Future[None]:
        """Done once the connection is gone (with an exception when it was not our doing).
        aiomqtt keeps it private; it is set by every way a connection ends (DISCONNECT, a read
        or write error on the socket, a keepalive not answered)."""
        return self._disconnected

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any = None) -> None:
        self.session_present = bool(getattr(flags, "session_present", False))
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any = None) -> None:
        value = getattr(reason_code, "value", None)
        if isinstance(value, int) and value != 0:
            self.disconnect_reason = value
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        # A publish the broker refused (MQTT 5 PUBACK 0x87, not authorised) must not pass
        # silently, or a misconfigured client would resend into the void forever.
        if getattr(reason_code, "is_failure", False) and self._on_publish_refused is not None:
            self._on_publish_refused(int(reason_code.value))
        super()._on_publish(client, userdata, mid, reason_code, properties)
