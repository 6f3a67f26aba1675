"""A durable :class:`~broker.store.Store`: the in-memory store, journaled to SQLite.

:class:`SqliteStore` is a :class:`~broker.store.MemoryStore` (the dicts and the subscription
trie stay the hot path) that remembers what changed (sessions, subscriptions, queued and
in-flight deliveries, retained messages, delayed wills) and writes it in one transaction
when :meth:`SqliteStore.commit` is called: by the server every ``persistence_interval``
seconds (default mode), or at the end of every event-loop turn that holds back
acknowledgements (strict mode, see :attr:`broker.engine.Broker.strict`).  The journal keeps
references, not copies: a commit writes each changed record as it is at commit time, so a
message queued and acknowledged between two commits costs no write at all.

Schema (``DIR/qmig.db``, WAL mode): ``sessions`` (one row per session with an expiry
interval > 0; subscriptions and the inbound QoS 2 packet ids as JSON), ``deliveries`` (one
row per queued or in-flight message of such a session, ordered by ``seq``), ``retained``,
``wills`` (delayed wills) and ``meta`` (schema version).  Times are wall-clock (Unix) in the
file and monotonic in memory.  See docs/durability.md for what each sync mode can lose.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import IO, Any

from mqttproto.codec import PacketReader, encode_publish
from mqttproto.errors import MQTTError
from mqttproto.packets import MQTT_5, Publish, Will
from mqttproto.properties import PropertyId

from .session import NEVER_EXPIRES, Delivery, Message, Session, SubOptions
from .store import MemoryStore, StoreError, WillEntry

log = logging.getLogger("qmig.broker")

SCHEMA_VERSION = "1"
DB_NAME = "qmig.db"
LOCK_NAME = "qmig.lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    client_id TEXT PRIMARY KEY, version INTEGER NOT NULL, username TEXT,
    expiry_interval INTEGER NOT NULL, expires REAL, subscriptions TEXT NOT NULL,
    inbound_qos2 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    client_id TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    props BLOB, msg_qos INTEGER NOT NULL, msg_retain INTEGER NOT NULL, expires REAL,
    sender TEXT, qos INTEGER NOT NULL, retain INTEGER NOT NULL, sub_ids TEXT,
    packet_id INTEGER NOT NULL, state INTEGER NOT NULL, PRIMARY KEY (client_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY, payload BLOB NOT NULL, props BLOB, qos INTEGER NOT NULL,
    expires REAL, sender TEXT
);
CREATE TABLE IF NOT EXISTS wills (
    client_id TEXT PRIMARY KEY, at REAL NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, props BLOB, username TEXT
);
"""


def _encode_props(props: dict[int, Any]) -> bytes | None:
    if not props:
        return None
    return encode_publish("p", b"", 0, False, False, None, props, MQTT_5)


def _decode_props(data: bytes | None) -> dict[int, Any]:
    if not data:
        return {}
    packets = PacketReader(MQTT_5).feed(data)
    if len(packets) != 1 or not isinstance(packets[0], Publish):
        raise ValueError("not an encoded property list")
    return dict(packets[0].properties)


class SqliteStore(MemoryStore):
    """:class:`MemoryStore` plus a journal of its changes, committed to SQLite (WAL)."""

    journaling = True

    def __init__(self, directory: str | Path, strict: bool = False) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.strict = strict
        self._lock: IO[bytes] | None = None
        self._db: sqlite3.Connection | None = None
        self._dirty_sessions: set[str] = set()
        self._dirty_deliveries: dict[Delivery, Session] = {}
        self._dirty_retained: set[str] = set()
        self._dirty_wills: dict[str, WillEntry | None] = {}
        # The delivery rows on disk, per session: a delivery acknowledged within the commit
        # interval (most of them) was never written, so it costs no DELETE either.
        self._stored: dict[str, set[int]] = {}
        self._seq = 0
        self.commits = 0
        self._open()

    # ----------------------------------------------------------------- open / close
    def _open(self) -> None:
        where = self.directory
        try:
            where.mkdir(parents=True, exist_ok=True)
            lock = open(where / LOCK_NAME, "ab")  # noqa: SIM115 - held until close()
        except OSError as exc:
            raise StoreError(f"persistence directory {where}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise StoreError(
                f"persistence directory {where} is in use by another broker (its lock file "
                f"{where / LOCK_NAME} is held)"
            ) from None
        self._lock = lock
        path = where / DB_NAME
        try:
            db = sqlite3.connect(path, isolation_level=None, timeout=2.0)
            self._db = db
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.strict else 'NORMAL'}")
            # Take the write lock once now: a file another process holds locked is an
            # error at start, not at the first commit with clients waiting for acks.
            db.execute("BEGIN IMMEDIATE")
            db.execute("COMMIT")
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise StoreError(f"{path} is corrupt (quick_check: {check and check[0]})")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise StoreError(f"{path} has schema {row[0]}, this broker reads {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot open the store {path}: {exc}") from exc
        except StoreError:
            self.close()
            raise

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ----------------------------------------------------------------- journal
    def note_session(self, session: Session) -> None:
        self._dirty_sessions.add(session.client_id)

    def note_delivery(self, session: Session, delivery: Delivery) -> None:
        if not delivery.seq:
            self._seq += 1
            delivery.seq = self._seq
        self._dirty_deliveries[delivery] = session

    def note_will(self, client_id: str, will: WillEntry | None) -> None:
        self._dirty_wills[client_id] = will

    def add_session(self, session: Session) -> None:
        super().add_session(session)
        self._dirty_sessions.add(session.client_id)

    def remove_session(self, client_id: str) -> Session | None:
        session = super().remove_session(client_id)
        self._dirty_sessions.add(client_id)
        return session

    def subscribe(self, session: Session, topic_filter: str, options: SubOptions) -> bool:
        self._dirty_sessions.add(session.client_id)
        return super().subscribe(session, topic_filter, options)

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        self._dirty_sessions.add(session.client_id)
        return super().unsubscribe(session, topic_filter)

    def set_retained(self, message: Message) -> None:
        super().set_retained(message)
        if not message.topic.startswith("$SYS"):
            self._dirty_retained.add(message.topic)

    def drop_retained(self, topic: str) -> None:
        super().drop_retained(topic)
        self._dirty_retained.add(topic)

    @property
    def dirty(self) -> bool:
        return bool(
            self._dirty_sessions
            or self._dirty_deliveries
            or self._dirty_retained
            or self._dirty_wills
        )

    # ----------------------------------------------------------------- commit
    def commit(self, now: float, wall: float) -> bool:
        """Write every change journaled since the last commit in one transaction.

        ``now`` is the broker's (monotonic) clock and ``wall`` Unix time, to convert
        deadlines.  On an error the journal is kept for the next commit and it raises.
        """
        if not self.dirty:
            return False
        db = self._db
        if db is None:
            raise StoreError("the store is closed")
        shift = wall - now

        def at(t: float | None) -> float | None:
            return None if t is None else t + shift

        sessions = self._sessions
        gone: list[str] = []  # sessions whose rows go, and delivery rows written / deleted,
        written: list[tuple[str, int]] = []  # applied to _stored once the commit holds
        deleted: list[tuple[str, int]] = []
        try:
            db.execute("BEGIN")
            for client_id in self._dirty_sessions:
                s = sessions.get(client_id)
                if s is None or s.expiry_interval == 0:
                    db.execute("DELETE FROM sessions WHERE client_id = ?", (client_id,))
                    db.execute("DELETE FROM deliveries WHERE client_id = ?", (client_id,))
                    gone.append(client_id)
                    continue
                subs = {
                    f: [o.qos, o.no_local, o.retain_as_published, o.retain_handling,
                        o.subscription_id]
                    for f, o in s.subscriptions.items()
                }  # fmt: skip
                expires = None
                if s.connection is None and s.expiry_interval != NEVER_EXPIRES:
                    expires = at(s.expires_at)
                db.execute(
                    "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (client_id, s.version, s.username, s.expiry_interval, expires,
                     json.dumps(subs), json.dumps(sorted(s.inbound_qos2))),
                )  # fmt: skip
            for d, s in self._dirty_deliveries.items():
                live = d.held and s.expiry_interval and sessions.get(s.client_id) is s
                if not live:
                    if d.seq in self._stored.get(s.client_id, ()):
                        db.execute(
                            "DELETE FROM deliveries WHERE client_id = ? AND seq = ?",
                            (s.client_id, d.seq),
                        )
                        deleted.append((s.client_id, d.seq))
                    continue
                written.append((s.client_id, d.seq))
                m = d.message
                db.execute(
                    "INSERT OR REPLACE INTO deliveries VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (s.client_id, d.seq, m.topic, m.payload, _encode_props(m.properties),
                     m.qos, m.retain, at(m.expires_at), m.sender, d.qos, d.retain,
                     json.dumps(d.subscription_ids) if d.subscription_ids else None,
                     d.packet_id if d.state else 0, d.state),
                )  # fmt: skip
            for topic in self._dirty_retained:
                r = self._retained.get(topic)
                if r is None:
                    db.execute("DELETE FROM retained WHERE topic = ?", (topic,))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO retained VALUES (?, ?, ?, ?, ?, ?)",
                        (topic, r.payload, _encode_props(r.properties), r.qos,
                         at(r.expires_at), r.sender),
                    )  # fmt: skip
            for client_id, entry in self._dirty_wills.items():
                if entry is None:
                    db.execute("DELETE FROM wills WHERE client_id = ?", (client_id,))
                    continue
                when, will, username = entry
                props = {
                    k: v for k, v in will.properties.items()
                    if k != PropertyId.WILL_DELAY_INTERVAL
                }  # fmt: skip
                db.execute(
                    "INSERT OR REPLACE INTO wills VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (client_id, when + shift, will.topic, will.payload, will.qos, will.retain,
                     _encode_props(props), username),
                )  # fmt: skip
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StoreError(f"cannot write the store {self.directory / DB_NAME}: {exc}") from exc
        for client_id, seq in deleted:
            self._stored[client_id].discard(seq)
        for client_id, seq in written:
            self._stored.setdefault(client_id, set()).add(seq)
        for client_id in gone:
            self._stored.pop(client_id, None)
        self._dirty_sessions.clear()
        self._dirty_deliveries.clear()
        self._dirty_retained.clear()
        self._dirty_wills.clear()
        self.commits += 1
        return True

    # ----------------------------------------------------------------- load
    def restore(self, now: float, wall: float) -> dict[str, WillEntry]:
        """Load the file into memory (sessions offline); returns the delayed wills.

        A session connected when the broker stopped gets its whole expiry interval from
        now (its client had no chance to come back); one already offline keeps its
        deadline, so one that expired while the broker was down expires at the first tick.
        """
        db = self._db
        if db is None:
            raise StoreError("the store is closed")
        path = self.directory / DB_NAME
        shift = now - wall

        def mono(t: float | None) -> float | None:
            return None if t is None else t + shift

        wills: dict[str, WillEntry] = {}
        try:
            for topic, payload, props, qos, expires, sender in db.execute(
                "SELECT topic, payload, props, qos, expires, sender FROM retained"
            ):
                message = Message(
                    topic, payload, qos, True, _decode_props(props), mono(expires), sender
                )
                super().set_retained(message)
            for cid, version, username, interval, expires, subs, qos2 in db.execute(
                "SELECT * FROM sessions"
            ):
                session = Session(cid, version, username, interval)
                session.inbound_qos2 = set(json.loads(qos2))
                if interval != NEVER_EXPIRES:
                    session.expires_at = now + interval if expires is None else mono(expires)
                super().add_session(session)
                for topic_filter, (q, nl, rap, rh, sid) in json.loads(subs).items():
                    super().subscribe(session, topic_filter, SubOptions(q, nl, rap, rh, sid))
            top_pid: dict[str, int] = {}
            for row in db.execute("SELECT * FROM deliveries ORDER BY client_id, seq"):
                (cid, seq, topic, payload, props, mqos, mretain, expires, sender, qos, retain,
                 sub_ids, packet_id, state) = row  # fmt: skip
                s = self._sessions.get(cid)
                if s is None:
                    continue  # its session was removed in the same commit
                message = Message(
                    topic, payload, mqos, bool(mretain), _decode_props(props), mono(expires),
                    sender,
                )  # fmt: skip
                d = Delivery(message, qos, bool(retain), json.loads(sub_ids) if sub_ids else None)
                d.seq = seq
                self._stored.setdefault(cid, set()).add(seq)
                self._seq = max(self._seq, seq)
                if state:
                    d.packet_id = packet_id
                    d.state = state
                    s.inflight[packet_id] = d
                    top_pid[cid] = max(top_pid.get(cid, 0), packet_id)
                else:
                    s.queue().append(d)
            for cid, pid in top_pid.items():
                self._sessions[cid].next_packet_id = pid + 1 if pid < 65535 else 1
            for cid, when, topic, payload, qos, retain, props, username in db.execute(
                "SELECT * FROM wills"
            ):
                will = Will(topic, payload, qos, bool(retain), _decode_props(props))
                wills[cid] = (when + shift, will, username)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store {path}: {exc}") from exc
        except (ValueError, TypeError, KeyError, MQTTError) as exc:
            raise StoreError(f"the store {path} holds a record it cannot read: {exc!r}") from exc
        log.info(
            "store %s: %d sessions, %d retained messages, %d queued or in-flight, %d wills",
            path, len(self._sessions), len(self._retained),
            sum(len(s.pending) + len(s.inflight) for s in self._sessions.values()), len(wills),
        )  # fmt: skip
        return wills


def open_store(directory: str, strict: bool) -> SqliteStore:
    """The durable store in ``directory``; a :class:`StoreError` if it cannot be used."""
    return SqliteStore(os.fspath(directory), strict)
