"""One MQTT connection that keeps itself up: connect, run the owner's tasks, back off, reconnect.

The state machine (:class:`LinkState`)::

    DISCONNECTED ──run()──► CONNECTING ──CONNACK accepted──► CONNECTED
                               │  ▲                              │
        refused, unreachable,  │  │ the wait is over             │ on_connected returned or raised,
        timed out              ▼  │                              │ the connection dropped
                            BACKING_OFF ◄────────────────────────┘
    stop() from any state ──► STOPPED (run() returns)

While CONNECTED the owner's ``on_connected(client, session_present)`` runs its tasks (reader,
sender, ...) for the life of the connection; the link watches the connection beside it and
cancels it when the connection drops or :meth:`MqttLink.stop` is called. Whatever ends a
connection is caught and reported as a :class:`~mqttlink.errors.LinkError` through the state
listeners: nothing but cancellation of :meth:`MqttLink.run` itself ends the loop.

Every connection is MQTT 5 with the settings' clean-start flag (false: the broker keeps the
session, its subscriptions and the QoS 1 messages queued meanwhile, for ``session_expiry_s``) and
``TCP_NODELAY`` (:data:`protocol.transport.SOCKET_OPTIONS`). Whether the broker resumed the
session is the CONNACK session-present flag, handed to ``on_connected``.

The wait between attempts comes from :class:`~mqttlink.backoff.Backoff`: it doubles while
attempts fail and starts over after a connection that lived, unless the broker said another
client took the session (DISCONNECT 0x8E) or the owner called :meth:`MqttLink.hold_backoff`:
two devices with one credential must not fight at full speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import ssl
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqttlink._client import LinkClient
from mqttlink.backoff import Backoff
from mqttlink.errors import (
    NOT_AUTHORISED_CODES,
    ConnectFailed,
    ConnectionDropped,
    ConnectRefused,
    HandlerFault,
    LinkError,
    NotAuthorised,
)
from mqttlink.settings import MqttSettings
from protocol.transport import SOCKET_OPTIONS

_log = logging.getLogger("alarmpost.mqtt")

Logger = logging.Logger | logging.LoggerAdapter[Any]


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"  # made, not run yet
    CONNECTING = "connecting"  # an attempt is under way (TCP, TLS, CONNECT, CONNACK)
    CONNECTED = "connected"  # the broker accepted us; on_connected is running
    BACKING_OFF = "backing_off"  # the last attempt or connection ended: waiting to try again
    STOPPED = "stopped"  # stop() was called (or run() cancelled): run() has returned


OnConnected = Callable[[aiomqtt.Client, bool], Awaitable[None]]
BeforeDisconnect = Callable[[aiomqtt.Client], Awaitable[None]]
StateListener = Callable[[LinkState, "LinkError | None"], None]
WillSource = aiomqtt.Will | Callable[[], aiomqtt.Will | None] | None


@dataclass(frozen=True)
class Transition:
    state: LinkState
    error: LinkError | None
    at: float  # time.monotonic()
    retry_in: float | None = None  # BACKING_OFF: the wait before the next attempt, in seconds


class MqttLink:
    """Keeps one MQTT connection up until :meth:`stop`.

    ``on_connected(client, session_present)`` is the owner's work for one connection: it is
    started on every successful connect and cancelled when the connection drops or the link
    stops. When it returns, the link disconnects and (after the backoff) connects again; when it
    raises an MQTT error, that counts as the connection dropping; anything else it raises is a
    :class:`HandlerFault` (logged with its traceback). ``before_disconnect(client)`` runs on a
    clean stop while still connected (publish a retained "offline": a clean DISCONNECT sends no
    Last Will). ``will`` is the Last Will, or a function that makes it for each attempt (a fresh
    timestamp). ``on_publish_refused(code)`` hears every PUBACK failure (MQTT 5 0x87: the ACL
    refused a publish), which aiomqtt's ``publish`` does not surface.

    :attr:`settings` is read at every attempt: assign new settings to use them from the next
    connection on. State changes reach every function in :attr:`state_listeners` and set the
    state's :meth:`event`; :attr:`counts` keeps totals for metrics.
    """

    def __init__(
        self,
        settings: MqttSettings,
        on_connected: OnConnected,
        *,
        will: WillSource = None,
        before_disconnect: BeforeDisconnect | None = None,
        on_publish_refused: Callable[[int], None] | None = None,
        backoff: Backoff | None = None,
        timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
        max_inflight_messages: int | None = None,
        logger: Logger | None = None,
    ) -> None:
        self.settings = settings
        self.backoff = backoff if backoff is not None else Backoff()
        self.timeout_s = timeout_s  # CONNACK, SUBACK, PUBACK and DISCONNECT waits
        self.stop_timeout_s = stop_timeout_s  # before_disconnect and the DISCONNECT on stop
        self.max_inflight_messages = max_inflight_messages
        self.log: Logger = logger if logger is not None else _log
        self.state = LinkState.DISCONNECTED
        self.error: LinkError | None = None  # why the last attempt or connection ended
        self.session_present: bool | None = None  # the last CONNACK's flag
        self.counts: Counter[str] = Counter()
        self.history: deque[Transition] = deque(maxlen=64)
        self.state_listeners: list[StateListener] = []
        self._on_connected = on_connected
        self._before_disconnect = before_disconnect
        self._on_publish_refused = on_publish_refused
        self._will = will
        self._events = {state: asyncio.Event() for state in LinkState}
        self._events[LinkState.DISCONNECTED].set()
        self._stopping = asyncio.Event()
        self._client: LinkClient | None = None
        self._hold = False
        self._running = False
        self._failures = 0  # attempts or connections in a row that ended without living

    # ------------------------------------------------------------------ for the owner
    @property
    def client(self) -> aiomqtt.Client | None:
        """The connected client, or None when not CONNECTED."""
        return self._client if self.state is LinkState.CONNECTED else None

    @property
    def connected(self) -> bool:
        return self.state is LinkState.CONNECTED

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Ask :meth:`run` to return: at once while backing off, after a clean DISCONNECT (and
        ``before_disconnect``) while connected. Safe to call from a signal handler, and more
        than once."""
        self._stopping.set()

    def hold_backoff(self) -> None:
        """This connection, however long it lives, does not reset the backoff when it ends
        (the owner found being connected to be the trouble: a clone of its credential)."""
        self._hold = True

    def event(self, state: LinkState) -> asyncio.Event:
        """Set while the link is in ``state``, cleared when it leaves it."""
        return self._events[state]

    async def wait_for(self, state: LinkState, within: float | None = None) -> None:
        """Return once the link is in ``state`` (``TimeoutError`` after ``within`` s)."""
        await asyncio.wait_for(self._events[state].wait(), within)

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        """Connect, serve, back off and reconnect until :meth:`stop`. Never raises but for
        cancellation; one link runs once."""
        if self._running:
            raise RuntimeError("MqttLink.run() is already running or has run")
        self._running = True
        try:
            while not self._stopping.is_set():
                try:
                    error = await self._connect_and_serve()
                except Exception as exc:  # a fault in the link itself must not end the loop
                    self.counts["link_faults"] += 1
                    self.log.exception("the MQTT link failed")
                    error = self._failed(LinkError(f"the link failed: {exc!r}"), exc)
                if self._stopping.is_set():
                    break
                delay = self.backoff.next_delay()
                self._set_state(LinkState.BACKING_OFF, error, retry_in=delay)
                self._log_retry(error, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):  # (wait_for can swallow a cancel)
                        await self._stopping.wait()
        finally:
            self._client = None
            self._set_state(LinkState.STOPPED, None)

    async def _connect_and_serve(self) -> LinkError | None:
        """One attempt, and the connection's life if it succeeds; what ended it (None: a stop,
        or ``on_connected`` returned)."""
        self._set_state(LinkState.CONNECTING, None)
        self.counts["attempts"] += 1
        settings = self.settings
        try:
            client = self._make_client(settings)
        except (OSError, ssl.SSLError) as exc:  # the TLS files cannot be read or used
            return self._failed(ConnectFailed(f"cannot set up TLS: {exc}"), exc)
        except Exception as exc:  # the owner's will function failed
            self.counts["handler_faults"] += 1
            self.log.error("could not make the Last Will", exc_info=exc)
            return self._failed(HandlerFault(exc), exc)
        entering = asyncio.ensure_future(client.__aenter__())
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({entering, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            _abandon(client, entering)
            raise
        finally:
            stopper.cancel()
        if not entering.done():  # stopped while connecting: do not wait for the broker
            _abandon(client, entering)
            return None
        failure = entering.exception()
        if failure is not None:
            _close_quietly(client)  # a CONNACK that comes after the time-out must not connect
            return self._failed(self._connect_error(failure), failure)
        return await self._serve(client, settings)

    async def _serve(self, client: LinkClient, settings: MqttSettings) -> LinkError | None:
        self._client = client
        self._hold = False
        self.session_present = client.session_present
        self.backoff.connected()
        self.counts["connected"] += 1
        if client.session_present:
            self.counts["sessions_resumed"] += 1
        self.log.info("connected to %s as client %r (%s)", settings.describe(), settings.identifier,
                      "session resumed" if client.session_present else "new session")
        self._set_state(LinkState.CONNECTED, None)
        dropped = client.dropped
        try:
            handler = asyncio.ensure_future(self._on_connected(client, client.session_present))
            stopper = asyncio.ensure_future(self._stopping.wait())
            try:
                watched: list[asyncio.Future[Any]] = [handler, stopper, dropped]
                await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)
            error = self._ending(client, handler, dropped)
            if self._stopping.is_set() and not dropped.done():
                await self._say_goodbye(client)
            await self._leave(client)
        except asyncio.CancelledError:  # run() itself cancelled: leave at once, then go
            _close_quietly(client)
            raise
        finally:
            self._client = None
        taken_over = isinstance(error, ConnectionDropped) and error.taken_over
        lived = self.backoff.lived
        self.backoff.disconnected(reset_if_lived=not (self._hold or taken_over))
        if lived:
            self._failures = 0
        if error is not None:
            self._failures += 1
        return error

    def _ending(self, client: LinkClient, handler: asyncio.Future[None],
                dropped: asyncio.Future[None]) -> LinkError | None:
        """What ended a connection, by precedence: a fault of the owner's, the connection
        lost, an MQTT operation of the owner's failing; None for a stop or a handler that
        returned."""
        handler_exc = None if handler.cancelled() else handler.exception()
        dropped_exc = None
        if dropped.done() and not dropped.cancelled():
            dropped_exc = dropped.exception()
        error: LinkError | None = None
        if handler_exc is not None and not isinstance(handler_exc, aiomqtt.MqttError):
            error = HandlerFault(handler_exc)
            error.__cause__ = handler_exc
            self.counts["handler_faults"] += 1
            self.log.error("%s", error, exc_info=handler_exc)
        elif dropped_exc is not None or (dropped.done() and not self._stopping.is_set()):
            cause = dropped_exc or handler_exc
            reason = client.disconnect_reason
            if reason is None and isinstance(dropped_exc, aiomqtt.MqttCodeError):
                reason = _code(dropped_exc.rc)
            error = ConnectionDropped(f"connection lost: {cause or 'closed by the broker'}", reason)
            error.__cause__ = cause
            self.counts["dropped"] += 1
            if error.taken_over:
                self.counts["taken_over"] += 1
        elif handler_exc is not None:
            error = ConnectionDropped(f"connection failed: {handler_exc}", client.disconnect_reason)
            error.__cause__ = handler_exc
            self.counts["dropped"] += 1
        elif handler.done() and not handler.cancelled():
            self.counts["handler_returned"] += 1
        return error

    async def _say_goodbye(self, client: LinkClient) -> None:
        if self._before_disconnect is None:
            return
        try:
            await asyncio.wait_for(self._before_disconnect(client), self.stop_timeout_s)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            self.log.info("could not finish before disconnecting: %s", exc or "timed out")
        except Exception:
            self.counts["handler_faults"] += 1
            self.log.exception("before_disconnect failed")

    async def _leave(self, client: LinkClient) -> None:
        """A clean DISCONNECT (no Last Will), unless the connection is already gone."""
        try:
            await asyncio.wait_for(client.__aexit__(None, None, None), self.stop_timeout_s)
        except (aiomqtt.MqttError, TimeoutError, OSError) as exc:
            self.log.info("no clean disconnect: %s", exc or "timed out")
            _close_quietly(client)
        dropped = client.dropped
        if dropped.done() and not dropped.cancelled():
            dropped.exception()  # a drop during the goodbye is no news: the link is leaving

    # ------------------------------------------------------------------ pieces
    def _make_client(self, s: MqttSettings) -> LinkClient:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = s.session_expiry_s
        will = self._will() if callable(self._will) else self._will
        return LinkClient(
            s.host, s.port,
            username=s.username or None,
            password=s.password or None,
            identifier=s.identifier or None,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=s.clean_start,
            properties=props,
            will=will,
            keepalive=s.keepalive_s,
            tls_context=s.tls_context(),
            timeout=self.timeout_s,
            max_inflight_messages=self.max_inflight_messages,
            socket_options=SOCKET_OPTIONS,
            on_publish_refused=self._publish_refused,
        )

    def _connect_error(self, exc: BaseException) -> LinkError:
        if isinstance(exc, MqttConnectError):
            code = _code(exc.rc)
            reason = str(exc.rc) if exc.rc is not None and not isinstance(exc.rc, int) else str(exc)
            if code in NOT_AUTHORISED_CODES:
                self.counts["refused_not_authorised"] += 1
                return NotAuthorised(code, reason)
            self.counts["refused"] += 1
            return ConnectRefused(code, reason)
        self.counts["unreachable"] += 1
        if isinstance(exc, aiomqtt.MqttError | OSError):
            return ConnectFailed(f"no connection to {self.settings.describe()}: {exc}")
        self.log.error("unexpected error while connecting", exc_info=exc)
        return ConnectFailed(f"no connection to {self.settings.describe()}: "
                             f"{type(exc).__name__}: {exc}")

    def _failed(self, error: LinkError, cause: BaseException) -> LinkError:
        error.__cause__ = cause
        self._failures += 1
        return error

    def _publish_refused(self, code: int) -> None:
        self.counts["publish_refused"] += 1
        if self._on_publish_refused is None:
            self.log.error("the broker refused a publish (reason 0x%02x)", code)
            return
        try:  # this runs inside aiomqtt's socket callback: an exception would drop the link
            self._on_publish_refused(code)
        except Exception:
            self.counts["listener_errors"] += 1
            self.log.exception("on_publish_refused failed")

    def _set_state(self, state: LinkState, error: LinkError | None,
                   retry_in: float | None = None) -> None:
        if state is self.state and error is None:
            return
        self._events[self.state].clear()
        self.state = state
        if state in (LinkState.CONNECTED, LinkState.BACKING_OFF):
            self.error = error
        self._events[state].set()
        self.history.append(Transition(state, error, time.monotonic(), retry_in))
        for listener in list(self.state_listeners):
            try:
                listener(state, error)
            except Exception:
                self.counts["listener_errors"] += 1
                self.log.exception("a link state listener failed")

    def _log_retry(self, error: LinkError | None, delay: float) -> None:
        if isinstance(error, HandlerFault):
            what = "the connection's handler failed"  # logged with its traceback already
        elif error is None:
            what = "the connection ended"
        else:
            what = str(error)
        # The first failure of an outage is a warning; the retries after it are not news.
        level = logging.WARNING if self._failures <= 1 else logging.INFO
        if error is None:
            level = logging.INFO
        self.log.log(level, "%s; reconnecting in %.1f s%s", what, delay,
                     f" (attempt {self._failures + 1})" if self._failures > 1 else "")


def _code(rc: object) -> int:
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else -1


def _close_quietly(client: LinkClient) -> None:
    """Drop a half-made connection at once (paho sends DISCONNECT if the socket is open)."""
    with contextlib.suppress(Exception):
        client._client.disconnect()


def _abandon(client: LinkClient, entering: asyncio.Future[Any]) -> None:
    """Give up on a connect under way without waiting for it. It is not cancelled (paho's
    blocking connect would go on in its thread and leave a live connection behind): when it
    finishes, whatever connection it made is closed at once."""

    def finished(future: asyncio.Future[Any]) -> None:
        if not future.cancelled():
            future.exception()  # retrieved: a refusal or time-out here is nobody's news
        _close_quietly(client)  # connected after all, or a socket still open without CONNACK

    entering.add_done_callback(finished)
