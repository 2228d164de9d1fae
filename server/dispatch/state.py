"""The dispatcher's records (jobs, pages, team live state) and the interface its parts share."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from protocol.messages import (
    Page,
)
from server.bus import Bus
from server.config import DispatchSection
from server.dispatch.selection import Choice, TeamIndex
from server.metrics import Metrics
from server.patrol import (
    Team,
)
from server.storage import Database, DispatchStore, IncidentStore, PostStore, TeamStore

if TYPE_CHECKING:
    pass

log = logging.getLogger("alarmpost.dispatch")

class DispatchError(ValueError):
    """An operator override that cannot be done; the message says why."""



@dataclass
class TeamLive:
    status: str | None = None
    status_at: float | None = None
    lat: float | None = None
    lon: float | None = None
    position_at: float | None = None
    dirty: bool = False


@dataclass
class PageRow:
    id: str
    incident_id: str
    team_id: str
    kind: str
    sent_at: float
    deadline: float
    state: str = "waiting"
    published_at: float | None = None
    answered_at: float | None = None
    detail: str = ""


@dataclass
class Job:
    """One incident the dispatcher is working on (a row of ``dispatch`` not ``done``)."""

    incident_id: str
    post_id: str
    state: str
    opened_at: float
    pressed_at: float | None = None
    team_id: str | None = None
    attempts: int = 0
    rounds: int = 0
    reason: str = ""
    exclude: set[str] = field(default_factory=set)
    pages: dict[str, PageRow] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None

    def waiting(self) -> list[PageRow]:
        return [p for p in self.pages.values() if p.state == "waiting"]

    def tried(self) -> set[str]:
        return {p.team_id for p in self.pages.values() if p.kind in ("direct", "operator")}

    def declined(self) -> set[str]:
        """Teams that declined, or whose page an operator cancelled, since the last re-dispatch."""
        return {p.team_id for p in self.pages.values()
                if p.state in ("declined", "cancelled") and not p.kind.endswith("-old")}



class Transition(Protocol):
    """Move an incident (audited); what :meth:`server.app.CentralServer.transition` does."""

    def __call__(self, incident_id: str, to: str, actor: str, *, reason: str = "",
                 classification: str | None = None) -> dict[str, Any]: ...


class Reject(Protocol):
    """Count and log a refused message."""

    def __call__(self, reason: str, topic: str, detail: str, *, retained: bool = False,
                 size: int = -1) -> None: ...


class DispatcherBase:
    """What the parts of the dispatcher (:mod:`.machine`, :mod:`.messages`, :mod:`.overrides`,
    :mod:`.views`) share: its state, and the steps each part offers the others."""

    config: DispatchSection
    bus: Bus
    metrics: Metrics
    transition: Transition
    reject: Reject
    db: Database  # for transactions that span stores
    store: DispatchStore
    team_store: TeamStore
    incidents: IncidentStore
    posts: PostStore
    teams: dict[str, Team]
    live: dict[str, TeamLive]
    index: TeamIndex
    jobs: dict[str, Job]  # active (not done), by incident id
    committed: dict[str, str]  # team id -> incident id (open page or assignment)
    _last_reload: float

    def reload_teams(self) -> None:
        raise NotImplementedError

    def drain(self) -> None:
        raise NotImplementedError

    def _dispatch(self, job: Job) -> None:
        raise NotImplementedError

    def _post(self, post_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def _note(self, incident_id: str, action: str, detail: str, at: float,
              actor: str = "dispatcher") -> None:
        raise NotImplementedError

    def _send(self, job: Job, post: dict[str, Any], targets: Sequence[Choice], kind: str,
              now: float, actor: str = "dispatcher") -> list[PageRow]:
        raise NotImplementedError

    def _set_committed(self, team_id: str, incident_id: str | None) -> None:
        raise NotImplementedError

    def _withdraw(self, rows: Iterable[PageRow], reason: str) -> None:
        raise NotImplementedError

    def _arm(self, job: Job) -> None:
        raise NotImplementedError

    def _closed(self, incident_id: str, state: str) -> None:
        raise NotImplementedError

    def _find_page(self, page_id: str) -> tuple[Job | None, PageRow | None]:
        raise NotImplementedError

    def _page_message(self, row: PageRow, post: dict[str, Any] | None = None) -> Page:
        raise NotImplementedError

    def _flush_live(self) -> None:
        raise NotImplementedError
