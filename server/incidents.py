"""The incident lifecycle: states, the transitions allowed between them, classifications.

::

    new ─► acknowledged ─► paged ─► accepted ─► en_route ─► on_scene ─► resolved
     │          │            ▲ │        │           │           │
     └──────────┴────────────┴─┴────────┴───────────┴───────────┴─────► cancelled / resolved

An operator acknowledging an incident moves it out of ``new`` only; later it is recorded
(who, when) without changing the state. ``paged`` may be re-entered (decline, timeout,
re-dispatch) from ``paged``, ``accepted`` or ``en_route``. ``resolved`` needs a classification.
Closed incidents never change again. Every transition is written to the append-only audit log.
"""

from __future__ import annotations

from typing import Final

STATES: Final = ("new", "acknowledged", "paged", "accepted", "en_route", "on_scene",
                 "resolved", "cancelled")
ACTIVE: Final = frozenset(STATES[:6])
CLOSED: Final = frozenset({"resolved", "cancelled"})
CLASSIFICATIONS: Final = ("crime", "medical", "traffic_crowd", "help_request", "false_alarm",
                          "test")

_NEXT: Final[dict[str, frozenset[str]]] = {
    "new": frozenset({"acknowledged", "paged", "resolved", "cancelled"}),
    "acknowledged": frozenset({"paged", "resolved", "cancelled"}),
    "paged": frozenset({"paged", "accepted", "resolved", "cancelled"}),
    "accepted": frozenset({"paged", "en_route", "on_scene", "resolved", "cancelled"}),
    "en_route": frozenset({"paged", "on_scene", "resolved", "cancelled"}),
    "on_scene": frozenset({"resolved", "cancelled"}),
}


class InvalidTransition(ValueError):
    """The incident cannot go there from where it is; the message says why."""


def next_state(current: str, to: str, classification: str | None = None) -> str:
    """The state after asking for ``to`` in ``current``; raise :class:`InvalidTransition`."""
    if current in CLOSED:
        raise InvalidTransition(f"the incident is already {current}")
    if to not in STATES:
        raise InvalidTransition(f"unknown state {to!r}")
    if to == "acknowledged" and current != "new":
        return current  # recorded in the audit log and on the incident, the state stays
    if to not in _NEXT[current]:
        raise InvalidTransition(f"cannot go from {current} to {to}")
    if to == "resolved" and classification not in CLASSIFICATIONS:
        raise InvalidTransition(
            f"resolving needs a classification, one of: {', '.join(CLASSIFICATIONS)}"
        )
    return to
