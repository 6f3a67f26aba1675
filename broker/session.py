"""What the broker remembers per client: messages, subscription options and sessions.

These are plain records; the rules that act on them live in :mod:`broker.engine` and
:mod:`broker.connection`.  Everything here is in process memory on purpose: that memory is
exactly what CRIU checkpoints and restores when the broker container migrates.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mqttproto.packets import Will
from mqttproto.properties import UserProperties

if TYPE_CHECKING:
    from .connection import BrokerConnection

NEVER_EXPIRES = 0xFFFFFFFF


class _NoDeliveries(deque[Any]):
    """The one empty queue every session starts with; it refuses items (Session.queue()).

    A deque allocates a 64-slot block when it is made: two per session were 1.5 KB for
    every idle client (issue #16).  Reading, iterating, ``clear`` and ``popleft`` (empty:
    IndexError) behave as on any empty deque; adding raises, so a writer that forgot to
    take its own queue fails loudly instead of sharing its items with every session.
    """

    def append(self, item: Any) -> None:
        raise TypeError(
            "the shared empty queue takes no items: use Session.queue()/.queue_replays()"
        )

    appendleft = append

    def extend(self, items: Any) -> None:
        self.append(None)

    extendleft = extend

    def insert(self, index: int, item: Any) -> None:
        self.append(item)


class _NoPacketIds(set[int]):
    """The one empty set of QoS 2 packet ids every session starts with; it refuses ids."""

    def add(self, item: int) -> None:
        raise TypeError("the shared empty set takes no ids: use Session.qos2_ids()")

    def update(self, *items: Any) -> None:
        self.add(0)


NO_DELIVERIES: deque[Any] = _NoDeliveries()
NO_PACKET_IDS: set[int] = _NoPacketIds()


@dataclass(slots=True, eq=False)
class Message:
    """An application message as routed: immutable once published."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[int, Any]
    expires_at: float | None = None
    sender: str | None = None
    # Encoded PUBLISH bytes for QoS 0 deliveries without per-subscriber properties,
    # keyed by (is_v5, retain flag): fan-out encodes each message at most a few times.
    encoded: dict[tuple[bool, bool], bytes] | None = None
    # Queue accounting (broker.engine's byte budgets): the bytes :func:`message_size` gave
    # (0: not measured yet) and how many queued or in-flight deliveries hold the message.
    size: int = 0
    holders: int = 0
    # Set by the store when this becomes the retained message of its topic: the store's
    # count of retained messages set so far (0: never retained).  See RetainedReplay.
    retained_seq: int = 0


# What one queued delivery costs beyond its message: the Delivery record and its slot in the
# session's queue (measured with sys.getsizeof, rounded up).  Charged per delivery, so a
# flood of empty messages is bounded in bytes too, not only by max_queued_messages.
DELIVERY_OVERHEAD = 128


def message_size(message: Message) -> int:
    """Bytes a message holds for the queue budgets: payload, topic and properties."""
    size = message.size
    if not size:
        size = len(message.payload) + len(message.topic)
        for value in message.properties.values():
            if isinstance(value, bytes | str):
                size += len(value)
            elif isinstance(value, UserProperties):  # kept as their wire bytes
                size += len(value.wire)
            elif isinstance(value, list):  # user properties (name, value) or identifiers
                for item in value:
                    size += len(item[0]) + len(item[1]) if isinstance(item, tuple) else 4
            else:
                size += 4
        message.size = size = max(size, 1)
    return size


@dataclass(slots=True)
class SubOptions:
    """Options of one subscription (section 3.8.3.1) plus its subscription identifier."""

    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_id: int | None = None
    # Multi-stream QUIC: the data channel the SUBSCRIBE came on (0: the control stream).
    channel: int = 0


# States of an outgoing QoS > 0 delivery.
AWAIT_PUBACK = 1  # QoS 1 PUBLISH sent
AWAIT_PUBREC = 2  # QoS 2 PUBLISH sent
AWAIT_PUBCOMP = 3  # PUBREL sent


@dataclass(slots=True, eq=False)
class Delivery:
    """One message on its way to one session, with the options that shape the PUBLISH."""

    message: Message
    qos: int
    retain: bool
    subscription_ids: list[int] | None = None
    packet_id: int = 0
    state: int = 0
    channel: int = 0  # see SubOptions.channel
    held: int = 0  # bytes charged to the session's queue budget for it (0: not charged)
    seq: int = 0  # its row in a durable store (broker.persist), 0: never journaled


@dataclass(slots=True, eq=False)
class RetainedReplay:
    """The retained messages one subscription still has to receive (MQTT-3.3.1-9/10/11).

    They go out in bounded batches as the connection's output drains (Broker.step_replays),
    not all within the SUBSCRIBE's event-loop turn.  ``horizon`` is the store's retained
    sequence number when the subscription was made: a retained message set after it was
    delivered live through the subscription, so the replay sends only messages that were
    retained by then and still are.  ``messages`` is the store's snapshot of candidates,
    taken when the replay starts (only the session's oldest replay holds one).
    """

    topic_filter: str
    horizon: int
    messages: list[Message] | None = None
    position: int = 0


@dataclass(slots=True, eq=False)
class Session:
    """MQTT session state (section 4.1), which outlives connections when expiry allows."""

    client_id: str
    version: int
    username: str | None = None
    expiry_interval: int = 0
    subscriptions: dict[str, SubOptions] = field(default_factory=dict)
    inflight: dict[int, Delivery] = field(default_factory=dict)
    # The three start as shared empties that refuse items: add through queue(),
    # qos2_ids() and queue_replays(), which give the session its own on first use.
    pending: deque[Delivery] = field(default_factory=lambda: NO_DELIVERIES)
    inbound_qos2: set[int] = field(default_factory=lambda: NO_PACKET_IDS)
    # Retained messages owed to new subscriptions, oldest first (one per topic filter).
    replays: deque[RetainedReplay] = field(default_factory=lambda: NO_DELIVERIES)
    next_packet_id: int = 1
    connection: BrokerConnection | None = None
    expires_at: float | None = None
    will: Will | None = None
    dropped: int = 0
    # Bytes of the messages in ``pending`` and ``inflight`` (Broker.hold/release), and
    # whether reaching max_queued_bytes was logged (again once it fell below half).
    held_bytes: int = 0
    over_budget: bool = False

    def queue(self) -> deque[Delivery]:
        """``pending``, to append to (its own deque from the first message on)."""
        if self.pending is NO_DELIVERIES:
            self.pending = deque()
        return self.pending

    def queue_replays(self) -> deque[RetainedReplay]:
        """``replays``, to append to."""
        if self.replays is NO_DELIVERIES:
            self.replays = deque()
        return self.replays

    def qos2_ids(self) -> set[int]:
        """``inbound_qos2``, to add to."""
        if self.inbound_qos2 is NO_PACKET_IDS:
            self.inbound_qos2 = set()
        return self.inbound_qos2

    def allocate_packet_id(self) -> int:
        """The next packet identifier not in use by an in-flight delivery (MQTT-2.2.1-3)."""
        pid = self.next_packet_id
        inflight = self.inflight
        for _ in range(65535):
            if pid not in inflight:
                break
            pid = pid + 1 if pid < 65535 else 1
        else:  # pragma: no cover - the in-flight window is far below 65535
            raise RuntimeError("no free packet identifier")
        self.next_packet_id = pid + 1 if pid < 65535 else 1
        return pid
