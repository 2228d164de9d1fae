"""One MQTT link for every alarmpost program: the edge agent, the server and the simulated
patrol teams.

- :class:`MqttSettings`: where and as whom to connect (the ``[mqtt]`` section of each program).
- :class:`MqttLink`: connect, run the owner's tasks for the life of the connection, back off,
  reconnect and resume the persistent session, with an explicit :class:`LinkState`.
- :class:`Backoff`: doubling waits that start over after a connection that lived.
- The reasons a connection ends: :class:`ConnectFailed`, :class:`ConnectRefused`,
  :class:`NotAuthorised`, :class:`ConnectionDropped`, :class:`HandlerFault`.

Imports ``protocol`` (socket options, configuration errors) and nothing else of ours; ``edge``,
``server`` and ``firmware_sim`` import it.
"""

from mqttlink.backoff import Backoff
from mqttlink.errors import (
    SESSION_TAKEN_OVER,
    ConnectFailed,
    ConnectionDropped,
    ConnectRefused,
    HandlerFault,
    LinkError,
    NotAuthorised,
)
from mqttlink.link import LinkState, MqttLink, Transition
from mqttlink.settings import MqttSettings

__all__ = [
    "SESSION_TAKEN_OVER",
    "Backoff",
    "ConnectFailed",
    "ConnectRefused",
    "ConnectionDropped",
    "HandlerFault",
    "LinkError",
    "LinkState",
    "MqttLink",
    "MqttSettings",
    "NotAuthorised",
    "Transition",
]
