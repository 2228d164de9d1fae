"""MQTT transport settings both sides use.

paho-mqtt does not set TCP_NODELAY: without it a small publish can wait ~40 ms for the peer's
delayed ACK (Nagle). Every alarmpost MQTT client passes these socket options.
"""

from __future__ import annotations

import socket
from typing import Final

SOCKET_OPTIONS: Final = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
