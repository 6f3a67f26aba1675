"""The commit point of a post-copy migration: acknowledge nothing a rollback would forget.

After a post-copy restore the broker serves at the destination while its memory is still
arriving.  Until every page is there, the move can fail and the broker resume at the source
from the image frozen at the checkpoint, which knows nothing of what happened since.  If the
destination had acknowledged a message meanwhile, the publisher would not send it again and
the rollback would lose it.  So from pre-checkpoint until the commit (or the rollback) the
broker is *provisional* (``pre-checkpoint`` with ``provisional: SECONDS``), and these rules
hold, as in Remus's output commit (docs/protocol.md section 8):

1. It keeps serving: QoS 0 and QoS 1 messages are routed and delivered at once, subscribers'
   PUBACK/PUBREC/PUBCOMP are taken, PINGREQ is answered.
2. It withholds every acknowledgement that tells a client a state change was made here:
   PUBACK, PUBREC and PUBCOMP for inbound messages, PUBREL for outbound QoS 2 deliveries
   (so a subscriber keeps the packet id and drops the source's resend as a duplicate),
   SUBACK and UNSUBACK.  They are kept per connection in the order they were made, with the
   stream they belong to.
3. An inbound QoS 2 message is not routed while provisional: its packet id is taken (a
   resend is a duplicate) and the message is kept, charged to the broker's byte budget
   (``max_queued_bytes_total``; over it the PUBREC says 0x97 at once).  Routing it now and
   then rolling back would deliver it twice: its publisher, never told PUBREC, sends it
   again to the source.
4. ``commit()`` (the destination has every page) and ``rollback()`` (the source resumes from
   its frozen image, where all that was held is real state) end it: the kept QoS 2 messages
   are routed in arrival order, then the held acknowledgements go out in order (through the
   durability barrier in strict mode).
5. A connection that closes meanwhile loses what was held for it: its client sends those
   messages again on its session, as after any lost connection.
6. The phase has a deadline, given by the orchestrator: if neither step comes by then, the
   broker commits by itself and logs a warning, so acknowledgements are never held forever.

:class:`Provisional` keeps the held items; :class:`broker.engine.Broker` applies the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mqttproto.packets import Publish

    from .connection import BrokerConnection

# Longest provisional phase the control API accepts, seconds (a lazy phase over 10 Mbit/s
# takes tens of seconds; an hour is far past any).
MAX_PROVISIONAL_SECONDS = 3600.0
DEFERRED_OVERHEAD = 128  # bytes charged per kept QoS 2 message besides topic and payload


@dataclass
class Deferred:
    """An inbound QoS 2 PUBLISH kept until the commit (rule 3)."""

    conn: BrokerConnection
    topic: str
    packet: Publish
    channel: int
    cost: int


@dataclass
class Provisional:
    """What a provisional broker holds back, and until when (wall-clock ``deadline``)."""

    deadline: float
    acks: list[tuple[BrokerConnection, bytes, int]] = field(default_factory=list)
    deferred: list[Deferred] = field(default_factory=list)
    deferred_bytes: int = 0

    def counts(self) -> dict[str, int]:
        return {"held_acks": len(self.acks), "held_qos2": len(self.deferred),
                "held_qos2_bytes": self.deferred_bytes}  # fmt: skip
