"""Broker state behind one interface: sessions, the subscription index and retained messages.

:class:`Store` is the interface the engine uses; :class:`MemoryStore` keeps everything in
process memory, which is what a CRIU checkpoint carries to the next edge host.
:class:`broker.persist.SqliteStore` (``--persistence DIR``) is a MemoryStore that also
journals its changes to SQLite, so that the broker survives a crash or a restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from mqttproto.packets import Will
from mqttproto.topics import SubscriptionTree, parse_shared

from .session import Delivery, Message, Session, SubOptions

# A delayed will: when it is due (the broker's clock), the will, its client's user name.
WillEntry = tuple[float, Will, str | None]


@dataclass(slots=True, eq=False)
class SharedGroup:
    """Members of one ``$share/{group}/{filter}``; each message goes to one of them."""

    members: dict[str, SubOptions] = field(default_factory=dict)
    cursor: int = 0


class Store(Protocol):
    def get_session(self, client_id: str) -> Session | None: ...
    def add_session(self, session: Session) -> None: ...
    def remove_session(self, client_id: str) -> Session | None: ...
    def sessions(self) -> Iterator[Session]: ...
    def session_count(self) -> int: ...
    def subscribe(self, session: Session, topic_filter: str, options: SubOptions) -> bool: ...
    def unsubscribe(self, session: Session, topic_filter: str) -> bool: ...
    def subscription_count(self) -> int: ...
    def match(
        self, topic: str
    ) -> tuple[list[dict[str, SubOptions]], list[dict[str, SharedGroup]]]: ...
    def set_retained(self, message: Message) -> None: ...
    def retained(self, topic: str) -> Message | None: ...
    def retained_version(self) -> int: ...
    def retained_candidates(self, topic_filter: str) -> list[Message]: ...
    def retained_count(self) -> int: ...
    def drop_retained(self, topic: str) -> None: ...

    # Journal hooks: the engine reports changes a durable store must write (session
    # fields, a delivery queued, sent, acknowledged or dropped, a delayed will); with
    # ``journaling`` False it does not call them.
    journaling: bool

    def note_session(self, session: Session) -> None: ...
    def note_delivery(self, session: Session, delivery: Delivery) -> None: ...
    def note_will(self, client_id: str, will: WillEntry | None) -> None: ...
    def restore(self, now: float, wall: float) -> dict[str, WillEntry]: ...


class StoreError(RuntimeError):
    """The store cannot be opened or read: the broker refuses to start rather than lose it."""


class MemoryStore:
    """The in-memory :class:`Store`."""

    journaling = False

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._subs: SubscriptionTree[str, SubOptions] = SubscriptionTree()
        self._shared: SubscriptionTree[str, SharedGroup] = SubscriptionTree()
        self._retained: dict[str, Message] = {}
        self._retained_seq = 0
        self._subscription_count = 0

    # sessions ------------------------------------------------------------------------
    def get_session(self, client_id: str) -> Session | None:
        return self._sessions.get(client_id)

    def add_session(self, session: Session) -> None:
        self._sessions[session.client_id] = session

    def remove_session(self, client_id: str) -> Session | None:
        session = self._sessions.pop(client_id, None)
        if session is not None:
            for topic_filter in list(session.subscriptions):
                self.unsubscribe(session, topic_filter)
        return session

    def sessions(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def session_count(self) -> int:
        return len(self._sessions)

    # subscriptions -------------------------------------------------------------------
    def subscribe(self, session: Session, topic_filter: str, options: SubOptions) -> bool:
        """Add or replace a subscription; True if it already existed (MQTT-3.8.4-3)."""
        existed = topic_filter in session.subscriptions
        session.subscriptions[topic_filter] = options
        group, inner = parse_shared(topic_filter)
        if group is None:
            self._subs.add(inner, session.client_id, options)
        else:
            shared = self._shared.get(inner, group)
            if shared is None:
                shared = SharedGroup()
                self._shared.add(inner, group, shared)
            shared.members[session.client_id] = options
        if not existed:
            self._subscription_count += 1
        return existed

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        group, inner = parse_shared(topic_filter)
        if group is None:
            self._subs.remove(inner, session.client_id)
        else:
            shared = self._shared.get(inner, group)
            if shared is not None:
                shared.members.pop(session.client_id, None)
                if not shared.members:
                    self._shared.remove(inner, group)
        self._subscription_count -= 1
        return True

    def subscription_count(self) -> int:
        return self._subscription_count

    def match(self, topic: str) -> tuple[list[dict[str, SubOptions]], list[dict[str, SharedGroup]]]:
        shared = self._shared.match(topic) if len(self._shared) else []
        return self._subs.match(topic), shared

    # retained messages ---------------------------------------------------------------
    def set_retained(self, message: Message) -> None:
        """Store, replace, or (empty payload) clear the retained message (MQTT-3.3.1-5/6/7)."""
        self._retained_seq += 1
        if message.payload:
            message.retained_seq = self._retained_seq
            self._retained[message.topic] = message
        else:
            self._retained.pop(message.topic, None)

    def drop_retained(self, topic: str) -> None:
        self._retained.pop(topic, None)

    def retained(self, topic: str) -> Message | None:
        return self._retained.get(topic)

    def retained_version(self) -> int:
        """How many retained messages were set (or cleared) so far: a replay's horizon."""
        return self._retained_seq

    def retained_candidates(self, topic_filter: str) -> list[Message]:
        """Retained messages that may match ``topic_filter``, for a replay to walk.

        The topic's own for a filter without wildcards, else a copy of the list of them all
        (pointers, taken at C speed): matching 100,000 topics is what the replay paces, so
        it is left to it.
        """
        if "+" not in topic_filter and "#" not in topic_filter:
            message = self._retained.get(topic_filter)
            return [message] if message is not None else []
        return list(self._retained.values())

    def retained_count(self) -> int:
        return len(self._retained)

    # journal hooks (nothing to journal in memory) --------------------------------------
    def note_session(self, session: Session) -> None:
        pass

    def note_delivery(self, session: Session, delivery: Delivery) -> None:
        pass

    def note_will(self, client_id: str, will: WillEntry | None) -> None:
        pass

    def restore(self, now: float, wall: float) -> dict[str, WillEntry]:
        return {}
