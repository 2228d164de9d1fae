"""The dispatcher: page the nearest available patrol team, escalate, broadcast, queue.

When an alarm opens an incident (bus notice ``incident_opened``):

1. Pick the nearest *available* team (status ``available`` from its device, on shift, not
   committed to another incident, position known), by great-circle distance; a team whose own
   zone holds the post wins if it is at most ``zone_margin_km`` farther (:func:`choose`). A free
   team whose position is unknown is paged only when no team with a known position is free.
2. Page it at once (a row in ``pages`` first, then the notifiers: MQTT QoS 1 to its device).
3. Wait ``answer_timeout_s``. A decline or a timeout pages the next nearest team not yet tried.
4. After ``direct_pages`` (K) unanswered pages, or when no untried team is left, broadcast to
   every available team within ``broadcast_radius_km``: the first to accept takes the incident,
   the others get a :class:`PageWithdrawn` ("taken"). Rounds repeat until someone accepts.
5. With no team to page the incident is *queued*; the reason is on the incident (API) and the
   bus (``dispatch_queued``), and it is paged the moment a team frees up (oldest first).

A team has at most one open page or assignment at a time: it is never committed to two
incidents. Every incident state change goes through ``CentralServer.transition`` (audited);
dispatcher notes that do not change the state (timeouts, declines, queueing) are appended to
the same audit log. Dispatch state (``dispatch`` and ``pages`` tables) is written before any page
is sent, so after a restart the timers resume from the stored deadlines, pages not yet handed
to the broker are sent, and none is sent twice (a device also deduplicates by page id).

The package, a concept per module: :mod:`.selection` (which team), :mod:`.notifiers` (how a page
reaches it), :mod:`.state` (jobs and pages in memory), :mod:`.machine` (the state machine),
:mod:`.messages` (what teams send), :mod:`.overrides` (operators' commands), :mod:`.views` (what
the console shows); the tables are :class:`server.storage.DispatchStore`'s.
"""

from __future__ import annotations

from server.dispatch.machine import DispatchMachine
from server.dispatch.messages import TeamMessages
from server.dispatch.notifiers import MqttNotifier, Notifier, NotifierUnavailable
from server.dispatch.overrides import OperatorOverrides
from server.dispatch.selection import Choice, TeamIndex, haversine_np
from server.dispatch.state import DispatchError, Job, PageRow, Reject, TeamLive, Transition
from server.dispatch.views import DispatchViews

__all__ = ["Choice", "DispatchError", "Dispatcher", "Job", "MqttNotifier", "Notifier",
           "NotifierUnavailable", "PageRow", "Reject", "TeamIndex", "TeamLive", "Transition",
           "haversine_np"]


class Dispatcher(TeamMessages, OperatorOverrides, DispatchViews, DispatchMachine):
    """Lives beside :class:`server.app.CentralServer` (``server.dispatcher``), which passes it
    what it needs and nothing more: its config section, the storage, the bus, the metrics, and
    the two calls it makes back (``transition`` an incident, ``reject`` a team message)."""
