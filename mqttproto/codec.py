"""Encoding and incremental decoding of MQTT 3.1.1 and 5.0 control packets.

``encode(packet, version)`` turns a packet into bytes; :class:`PacketReader` takes bytes in
whatever chunks the transport delivers and returns every complete packet.  Decoding enforces
the specification's MUSTs and raises :class:`~mqttproto.errors.MQTTError` subclasses whose
``reason_code`` is the one to close the connection with.  PUBLISH, the hot path, is decoded
and encoded without generic helpers.
"""

from __future__ import annotations

from struct import Struct
from typing import Any

from .errors import (
    MalformedPacket,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    UnsupportedProtocolVersion,
)
from .packets import (
    MQTT_3_1,
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from .properties import (
    BOOLEAN,
    NONZERO,
    REPEATABLE,
    SPEC,
    WILL,
    Properties,
    PropertyId,
    UserProperties,
    WireType,
)
from .reasons import ConnackCode311, ReasonCode, connack_code_311, suback_code_311

MAX_REMAINING_LENGTH = 268_435_455
MAX_PACKET_SIZE = MAX_REMAINING_LENGTH + 5

_U16 = Struct("!H")
_U32 = Struct("!I")
_pack_u16 = _U16.pack
_pack_u32 = _U32.pack
_unpack_u16 = _U16.unpack_from
_unpack_u32 = _U32.unpack_from

# Fixed-header flags that the specification reserves (section 2.1.3).
_REQUIRED_FLAGS = {t: 0 for t in range(1, 16)}
_REQUIRED_FLAGS.update({PacketType.PUBREL: 2, PacketType.SUBSCRIBE: 2, PacketType.UNSUBSCRIBE: 2})

_PROTOCOL_NAMES = {MQTT_3_1: b"MQIsdp", MQTT_3_1_1: b"MQTT", MQTT_5: b"MQTT"}

# A 3.1.1 CONNACK return code read back as the MQTT 5 reason code it stands for, so that
# ``Connack.reason_code`` means the same for every version (``encode`` maps the other way).
_CONNACK_FROM_311: dict[int, int] = {
    ConnackCode311.ACCEPTED: ReasonCode.SUCCESS,
    ConnackCode311.UNACCEPTABLE_PROTOCOL_VERSION: ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    ConnackCode311.IDENTIFIER_REJECTED: ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
    ConnackCode311.SERVER_UNAVAILABLE: ReasonCode.SERVER_UNAVAILABLE,
    ConnackCode311.BAD_USERNAME_OR_PASSWORD: ReasonCode.BAD_USER_NAME_OR_PASSWORD,
    ConnackCode311.NOT_AUTHORIZED: ReasonCode.NOT_AUTHORIZED,
}
# The only SUBACK return codes 3.1.1 defines (MQTT-3.9.3-2); they equal their MQTT 5 codes.
_SUBACK_CODES_311 = frozenset({0x00, 0x01, 0x02, 0x80})

# The MQTT 5 reason codes each packet type may carry (5.0 sections 3.2.2.2, 3.4.2.1, 3.5.2.1,
# 3.6.2.1, 3.7.2.1, 3.9.3, 3.11.3, 3.14.2.1, 3.15.2.1; MQTT-3.2.2-8, -3.4.2-1, -3.5.2-1,
# -3.6.2-1, -3.7.2-1, -3.9.3-1, -3.11.3-1, -3.14.2-1, -3.15.2-1).  Anything else is malformed.
_PUB_ACK_REASONS = frozenset(bytes.fromhex("00 10 80 83 87 90 91 97 99"))
_REASONS: dict[int, frozenset[int]] = {
    PacketType.CONNACK: frozenset(
        bytes.fromhex("00 80 81 82 83 84 85 86 87 88 89 8A 8C 90 95 97 99 9A 9B 9C 9D 9F")
    ),
    PacketType.PUBACK: _PUB_ACK_REASONS,
    PacketType.PUBREC: _PUB_ACK_REASONS,
    PacketType.PUBREL: frozenset({0x00, 0x92}),
    PacketType.PUBCOMP: frozenset({0x00, 0x92}),
    PacketType.SUBACK: frozenset(bytes.fromhex("00 01 02 80 83 87 8F 91 97 9E A1 A2")),
    PacketType.UNSUBACK: frozenset(bytes.fromhex("00 11 80 83 87 8F 91")),
    PacketType.DISCONNECT: frozenset(
        bytes.fromhex(
            "00 04 80 81 82 83 87 89 8B 8D 8E 8F 90 93 94 95 96 97 98 99 9A 9B 9C 9D 9E 9F A0 A1 A2"
        )
    ),
    PacketType.AUTH: frozenset({0x00, 0x18, 0x19}),
}


# --------------------------------------------------------------------------- primitives


def encode_varint(value: int) -> bytes:
    """Variable Byte Integer (section 1.5.5)."""
    if value < 128:
        return bytes((value,))
    if value > MAX_REMAINING_LENGTH:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _encode_str(value: str) -> bytes:
    data = value.encode()
    if len(data) > 65535:
        raise ValueError("UTF-8 string longer than 65535 bytes")
    return _pack_u16(len(data)) + data


def _encode_bin(value: bytes) -> bytes:
    if len(value) > 65535:
        raise ValueError("binary data longer than 65535 bytes")
    return _pack_u16(len(value)) + bytes(value)


def _decode_varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    for i in range(4):
        if pos >= end:
            raise MalformedPacket("truncated variable byte integer")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if i and byte == 0:
                # MQTT-1.5.5-1: the minimal number of bytes MUST be used.
                raise MalformedPacket("variable byte integer not minimally encoded")
            return value, pos
        shift += 7
    raise MalformedPacket("variable byte integer longer than 4 bytes")


def _decode_str(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    if pos + 2 > end:
        raise MalformedPacket("truncated string length")
    (length,) = _unpack_u16(buf, pos)
    pos += 2
    stop = pos + length
    if stop > end:
        raise MalformedPacket("string runs past the end of the packet")
    try:
        text = buf[pos:stop].decode()  # strict: rejects surrogates (MQTT-1.5.4-1)
    except UnicodeDecodeError as exc:
        raise MalformedPacket("invalid UTF-8 string") from exc
    if "\x00" in text:
        raise MalformedPacket("UTF-8 string contains U+0000")  # MQTT-1.5.4-2
    return text, stop


def _decode_bin(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise MalformedPacket("truncated binary length")
    (length,) = _unpack_u16(buf, pos)
    pos += 2
    stop = pos + length
    if stop > end:
        raise MalformedPacket("binary data runs past the end of the packet")
    return bytes(buf[pos:stop]), stop


def _decode_u16(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos + 2 > end:
        raise MalformedPacket("truncated two byte integer")
    return _unpack_u16(buf, pos)[0], pos + 2


# --------------------------------------------------------------------------- properties


def encode_properties(props: Properties, packet_type: int) -> bytes:
    """Encode a property dict; an identifier not allowed in ``packet_type`` is a ValueError."""
    if not props:
        return b"\x00"
    out = bytearray()
    for pid, value in props.items():
        spec = SPEC.get(pid)
        if spec is None or packet_type not in spec[1]:
            raise ValueError(f"property {pid:#x} is not allowed in packet type {packet_type}")
        if value.__class__ is UserProperties:
            out += value.wire  # decoded earlier: forwarded as it came, in order (3.3.2-18)
            continue
        wire = spec[0]
        values = value if pid in REPEATABLE and isinstance(value, list) else [value]
        for item in values:
            out += encode_varint(pid)
            if wire is WireType.BYTE:
                out.append(int(item))
            elif wire is WireType.UINT16:
                out += _pack_u16(item)
            elif wire is WireType.UINT32:
                out += _pack_u32(item)
            elif wire is WireType.VARINT:
                out += encode_varint(item)
            elif wire is WireType.UTF8:
                out += _encode_str(item)
            elif wire is WireType.BINARY:
                out += _encode_bin(item)
            else:
                key, val = item
                out += _encode_str(key) + _encode_str(val)
    return encode_varint(len(out)) + bytes(out)


class UserPropertyBudget:
    """What one packet may still carry in User Properties: a count and their bytes.

    User Property and Subscription Identifier are the properties that may repeat, so the
    only ones whose number a client controls; both draw on the count (a PUBLISH of 500,000
    Subscription Identifiers took 0.8 s to decode before being refused), and a CONNECT's
    will properties on the same budget as its own.
    """

    __slots__ = ("count", "max_count", "max_size", "size")

    def __init__(self, max_count: int, max_size: int) -> None:
        self.count = self.max_count = max_count
        self.size = self.max_size = max_size

    def refuse(self) -> MQTTError:
        # 0x97 Quota exceeded, "an implementation or administrative imposed limit has been
        # exceeded", is valid in CONNACK, DISCONNECT and every ack.  The packet is well
        # formed (not 0x81), within the Maximum Packet Size (not 0x95 Packet too large),
        # and 0x99 Payload format invalid is about the payload, not properties.
        return MQTTError(
            f"more user properties than this server accepts in one packet (at most "
            f"{self.max_count} repeated properties, {self.max_size} bytes of keys and values)",
            ReasonCode.QUOTA_EXCEEDED,
        )


def _decode_properties(
    buf: bytes,
    pos: int,
    end: int,
    packet_type: int,
    budget: UserPropertyBudget | None = None,
) -> tuple[Properties, int]:
    length, pos = _decode_varint(buf, pos, end)
    stop = pos + length
    if stop > end:
        raise MalformedPacket("properties run past the end of the packet")
    props: Properties = {}
    users: bytearray | None = None
    n_users = 0
    while pos < stop:
        if buf[pos] == 0x26:
            # User Property, the one identifier a packet may repeat as often as it likes:
            # inlined, checked against the budget before its strings are decoded, and kept
            # as wire bytes (UserProperties).  A non-minimal 0x26 is malformed (1.5.5-1)
            # and fails in _decode_varint below.
            kstop = pos + 3
            if kstop > stop:
                raise MalformedPacket("truncated string length")
            kstop += (buf[pos + 1] << 8) | buf[pos + 2]
            if kstop + 2 > stop:
                raise MalformedPacket("string runs past the end of the packet")
            vstop = kstop + 2 + ((buf[kstop] << 8) | buf[kstop + 1])
            if vstop > stop:
                raise MalformedPacket("string runs past the end of the packet")
            if budget is not None:
                budget.count -= 1
                budget.size -= vstop - pos - 5
                if budget.count < 0 or budget.size < 0:
                    raise budget.refuse()
            if vstop - pos > 5:
                kdata = buf[pos + 3 : kstop]
                vdata = buf[kstop + 2 : vstop]
                try:
                    kdata.decode()  # strict: rejects surrogates (MQTT-1.5.4-1)
                    vdata.decode()
                except UnicodeDecodeError as exc:
                    raise MalformedPacket("invalid UTF-8 string") from exc
                # UTF-8 has no 0x00 byte but U+0000's, so the bytes tell (MQTT-1.5.4-2).
                if b"\x00" in kdata or b"\x00" in vdata:
                    raise MalformedPacket("UTF-8 string contains U+0000")
            if users is None:
                users = bytearray()
                props[PropertyId.USER_PROPERTY] = None  # keeps its place in the dict's order
            users += buf[pos:vstop]
            n_users += 1
            pos = vstop
            continue
        pid, pos = _decode_varint(buf, pos, stop)
        spec = SPEC.get(pid)
        if spec is None:
            raise MalformedPacket(f"unknown property identifier {pid:#x}")
        wire, allowed = spec
        if packet_type not in allowed:
            raise MalformedPacket(f"property {pid:#x} not allowed in this packet")
        value: Any
        if wire is WireType.BYTE:
            if pos >= stop:
                raise MalformedPacket("truncated property")
            value = buf[pos]
            pos += 1
        elif wire is WireType.UINT16:
            value, pos = _decode_u16(buf, pos, stop)
        elif wire is WireType.UINT32:
            if pos + 4 > stop:
                raise MalformedPacket("truncated property")
            (value,) = _unpack_u32(buf, pos)
            pos += 4
        elif wire is WireType.VARINT:
            value, pos = _decode_varint(buf, pos, stop)
        elif wire is WireType.UTF8:
            value, pos = _decode_str(buf, pos, stop)
        else:  # BINARY; UTF8_PAIR is only User Property's, decoded above
            value, pos = _decode_bin(buf, pos, stop)
        if pid in BOOLEAN and value > 1:
            raise ProtocolError(f"property {PropertyId(pid).name} must be 0 or 1")
        if pid in NONZERO and value == 0:
            raise ProtocolError(f"property {PropertyId(pid).name} must not be 0")
        if pid in REPEATABLE:  # Subscription Identifier: it may repeat too, so it counts
            if budget is not None:
                budget.count -= 1
                if budget.count < 0:
                    raise budget.refuse()
            props.setdefault(pid, []).append(value)
        elif pid in props:
            raise ProtocolError(f"property {PropertyId(pid).name} included more than once")
        else:
            props[pid] = value
    if users is not None:
        props[PropertyId.USER_PROPERTY] = UserProperties(bytes(users), n_users)
    return props, stop


# --------------------------------------------------------------------------- encoding


def _frame(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_varint(len(body)) + body


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    packet_id: int | None,
    properties: Properties | None,
    version: int,
) -> bytes:
    """The hot path: encode a PUBLISH without building a packet object."""
    t = topic.encode()
    body = _pack_u16(len(t)) + t
    if qos:
        if not packet_id:
            raise ValueError("QoS > 0 PUBLISH needs a non-zero packet id")
        body += _pack_u16(packet_id)
    if version == MQTT_5:
        body += encode_properties(properties, PacketType.PUBLISH) if properties else b"\x00"
    first = 0x30 | (qos << 1) | (8 if dup else 0) | (1 if retain else 0)
    length = len(body) + len(payload)
    if length < 128:
        return bytes((first, length)) + body + payload
    return bytes((first,)) + encode_varint(length) + body + payload


def _encode_ack(first: int, packet_id: int, reason: int, props: Properties, version: int) -> bytes:
    if version == MQTT_5 and (reason or props):
        body = _pack_u16(packet_id) + bytes((reason,))
        if props:
            body += encode_properties(props, first >> 4)
        return _frame(first, body)
    return bytes((first, 2)) + _pack_u16(packet_id)


def encode(packet: Packet, version: int = MQTT_5) -> bytes:
    """Encode ``packet`` for protocol ``version`` (3, 4 or 5)."""
    v5 = version == MQTT_5
    # ``type(packet) is C`` narrows the union for mypy and is as cheap as comparing tags.
    if type(packet) is Publish:
        p = packet
        return encode_publish(
            p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id, p.properties, version
        )
    if isinstance(packet, (Puback, Pubrec, Pubcomp, Pubrel)):
        kind = packet.type
        first = (kind << 4) | (2 if kind == PacketType.PUBREL else 0)
        return _encode_ack(first, packet.packet_id, packet.reason_code, packet.properties, version)
    if type(packet) is Connect:
        return _encode_connect(packet)
    if type(packet) is Connack:
        c = packet
        code = c.reason_code if v5 else connack_code_311(c.reason_code)
        body = bytes((1 if c.session_present else 0, code))
        if v5:
            body += encode_properties(c.properties, PacketType.CONNACK)
        return _frame(0x20, body)
    if type(packet) is Subscribe:
        s = packet
        sbody = bytearray(_pack_u16(s.packet_id))
        if v5:
            sbody += encode_properties(s.properties, PacketType.SUBSCRIBE)
        for sub in s.subscriptions:
            options = sub.qos
            if v5:
                options |= (
                    (4 if sub.no_local else 0)
                    | (8 if sub.retain_as_published else 0)
                    | (sub.retain_handling << 4)
                )
            sbody += _encode_str(sub.topic_filter) + bytes((options,))
        return _frame(0x82, bytes(sbody))
    if type(packet) is Suback:
        sa = packet
        body = _pack_u16(sa.packet_id)
        if v5:
            body += encode_properties(sa.properties, PacketType.SUBACK)
            codes = bytes(sa.reason_codes)
        else:
            codes = bytes(suback_code_311(c) for c in sa.reason_codes)
        return _frame(0x90, body + codes)
    if type(packet) is Unsubscribe:
        u = packet
        ubody = bytearray(_pack_u16(u.packet_id))
        if v5:
            ubody += encode_properties(u.properties, PacketType.UNSUBSCRIBE)
        for f in u.topic_filters:
            ubody += _encode_str(f)
        return _frame(0xA2, bytes(ubody))
    if type(packet) is Unsuback:
        ua = packet
        body = _pack_u16(ua.packet_id)
        if v5:
            body += encode_properties(ua.properties, PacketType.UNSUBACK) + bytes(ua.reason_codes)
        return _frame(0xB0, body)
    if type(packet) is Pingreq:
        return b"\xc0\x00"
    if type(packet) is Pingresp:
        return b"\xd0\x00"
    if type(packet) is Disconnect:
        d = packet
        if not v5 or (d.reason_code == 0 and not d.properties):
            return b"\xe0\x00"
        body = bytes((d.reason_code,))
        if d.properties:
            body += encode_properties(d.properties, PacketType.DISCONNECT)
        return _frame(0xE0, body)
    if type(packet) is Auth:
        if not v5:
            raise ValueError("AUTH exists only in MQTT 5")
        a = packet
        if a.reason_code == 0 and not a.properties:
            return b"\xf0\x00"
        body = bytes((a.reason_code,)) + encode_properties(a.properties, PacketType.AUTH)
        return _frame(0xF0, body)
    raise ValueError(f"cannot encode {packet!r}")


def _encode_connect(c: Connect) -> bytes:
    version = c.protocol_version
    name = _PROTOCOL_NAMES.get(version)
    if name is None:
        raise ValueError(f"unknown protocol version {version}")
    flags = 0x02 if c.clean_start else 0
    if c.will is not None:
        flags |= 0x04 | (c.will.qos << 3) | (0x20 if c.will.retain else 0)
    if c.username is not None:
        flags |= 0x80
    if c.password is not None:
        flags |= 0x40
    body = bytearray(_pack_u16(len(name)) + name)
    body += bytes((version, flags)) + _pack_u16(c.keep_alive)
    if version == MQTT_5:
        body += encode_properties(c.properties, PacketType.CONNECT)
    body += _encode_str(c.client_id)
    if c.will is not None:
        if version == MQTT_5:
            body += encode_properties(c.will.properties, WILL)
        body += _encode_str(c.will.topic) + _encode_bin(c.will.payload)
    if c.username is not None:
        body += _encode_str(c.username)
    if c.password is not None:
        body += _encode_bin(c.password)
    return _frame(0x10, bytes(body))


# --------------------------------------------------------------------------- decoding


class PacketReader:
    """Incremental decoder: ``feed`` bytes, get complete packets.

    ``version`` is None until a CONNECT has been decoded (a server-side reader learns the
    version from it) or set explicitly (a client-side reader knows what it asked for).
    ``max_packet_size`` is the limit this side advertised: a larger packet raises
    :class:`PacketTooLarge` as soon as its fixed header is read, before its body arrives.
    ``max_user_properties`` and ``max_user_properties_size`` cap the User Properties of one
    packet (their count, Subscription Identifiers included, and the bytes of their keys and
    values): decoding stops at the first one over either, with an :class:`MQTTError`
    carrying 0x97 Quota exceeded.  None is no cap.
    """

    __slots__ = (
        "_buf",
        "_need",
        "max_packet_size",
        "max_user_properties",
        "max_user_properties_size",
        "version",
    )

    def __init__(
        self,
        version: int | None = None,
        max_packet_size: int = MAX_PACKET_SIZE,
        max_user_properties: int | None = None,
        max_user_properties_size: int | None = None,
    ) -> None:
        self.version = version
        self.max_packet_size = max_packet_size
        self.max_user_properties = max_user_properties
        self.max_user_properties_size = max_user_properties_size
        self._buf = bytearray()
        # Size of the incomplete packet held in ``_buf`` once its fixed header is known
        # (0 before that): until that many bytes are buffered ``feed`` only appends.
        self._need = 0

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete packet held back (lets the I/O layer spot stalled peers)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            data = bytes(buf)
        elif data.__class__ is not bytes:
            data = bytes(data)  # a bytearray/memoryview would leak into decoded fields
        packets: list[Packet] = []
        pos = 0
        end = len(data)
        limit = self.max_packet_size
        need = 0
        try:
            while end - pos >= 2:
                first = data[pos]
                # Remaining length, inlined for speed.
                length = data[pos + 1]
                hdr = 2
                if length & 0x80:
                    length &= 0x7F
                    shift = 7
                    while True:
                        if pos + hdr >= end:
                            if hdr >= 5:
                                raise MalformedPacket("remaining length longer than 4 bytes")
                            length = -1
                            break
                        byte = data[pos + hdr]
                        hdr += 1
                        length |= (byte & 0x7F) << shift
                        if not byte & 0x80:
                            if byte == 0:
                                raise MalformedPacket("remaining length not minimally encoded")
                            break
                        shift += 7
                        if hdr >= 5:
                            raise MalformedPacket("remaining length longer than 4 bytes")
                    if length < 0:
                        break
                if hdr + length > limit:
                    raise PacketTooLarge(
                        f"packet of {hdr + length} bytes exceeds the maximum of {limit}"
                    )
                stop = pos + hdr + length
                if stop > end:
                    need = hdr + length
                    break
                packets.append(self._decode(first, data, pos + hdr, stop))
                pos = stop
        except MQTTError as exc:
            self._buf = bytearray()
            self._need = 0
            # The packets before the bad one are valid: hand them over with the error so
            # the caller can act on them first (nothing a client sent correctly is lost).
            exc.decoded = packets
            raise
        self._need = need
        if pos < end:
            self._buf = bytearray(data[pos:]) if pos or not buf else buf
        elif buf:
            self._buf = bytearray()
        return packets

    def _budget(self) -> UserPropertyBudget | None:
        """A fresh allowance of User Properties for one packet (None: no caps)."""
        count, size = self.max_user_properties, self.max_user_properties_size
        if count is None and size is None:
            return None
        return UserPropertyBudget(
            MAX_PACKET_SIZE if count is None else count, MAX_PACKET_SIZE if size is None else size
        )

    def _decode(self, first: int, buf: bytes, pos: int, end: int) -> Packet:
        kind = first >> 4
        flags = first & 0x0F
        version = self.version
        if kind == 3:
            return self._decode_publish(flags, buf, pos, end)
        if kind == 0:
            raise MalformedPacket("reserved packet type 0")
        if flags != _REQUIRED_FLAGS[kind]:
            raise MalformedPacket(f"invalid fixed header flags for packet type {kind}")
        if version is None and kind != PacketType.CONNECT:
            raise ProtocolError("the first packet must be CONNECT")  # MQTT-3.1.0-1
        if kind in (4, 5, 6, 7):
            return self._decode_ack(kind, buf, pos, end)
        if kind == PacketType.CONNECT:
            return self._decode_connect(buf, pos, end)
        if kind == PacketType.SUBSCRIBE:
            return self._decode_subscribe(buf, pos, end)
        if kind == PacketType.UNSUBSCRIBE:
            return self._decode_unsubscribe(buf, pos, end)
        if kind == PacketType.PINGREQ or kind == PacketType.PINGRESP:
            if end != pos:
                raise MalformedPacket("PINGREQ/PINGRESP carry no remaining data")
            return Pingreq() if kind == PacketType.PINGREQ else Pingresp()
        if kind == PacketType.DISCONNECT or kind == PacketType.AUTH:
            return self._decode_disconnect_or_auth(kind, buf, pos, end)
        if kind == PacketType.CONNACK:
            return self._decode_connack(buf, pos, end)
        if kind == PacketType.SUBACK or kind == PacketType.UNSUBACK:
            return self._decode_suback(kind, buf, pos, end)
        raise MalformedPacket(f"unknown packet type {kind}")  # pragma: no cover

    def _decode_publish(self, flags: int, buf: bytes, pos: int, end: int) -> Publish:
        if self.version is None:
            raise ProtocolError("the first packet must be CONNECT")
        qos = (flags >> 1) & 3
        if qos == 3:
            raise MalformedPacket("PUBLISH with QoS 3")  # MQTT-3.3.1-4
        dup = bool(flags & 8)
        if dup and not qos:
            raise MalformedPacket("DUP set on a QoS 0 PUBLISH")  # MQTT-3.3.1-2
        if pos + 2 > end:
            raise MalformedPacket("truncated PUBLISH")
        tlen = (buf[pos] << 8) | buf[pos + 1]
        pos += 2
        tstop = pos + tlen
        if tstop > end:
            raise MalformedPacket("topic runs past the end of the packet")
        try:
            topic = buf[pos:tstop].decode()
        except UnicodeDecodeError as exc:
            raise MalformedPacket("topic name is not valid UTF-8") from exc
        if "\x00" in topic:
            raise MalformedPacket("topic name contains U+0000")
        pos = tstop
        packet_id = None
        if qos:
            if pos + 2 > end:
                raise MalformedPacket("truncated PUBLISH packet identifier")
            packet_id = (buf[pos] << 8) | buf[pos + 1]
            if not packet_id:
                raise ProtocolError("PUBLISH packet identifier 0")  # MQTT-2.2.1-3
            pos += 2
        props: Properties
        if self.version == MQTT_5:
            if pos < end and buf[pos] == 0:
                props = {}
                pos += 1
            else:
                props, pos = _decode_properties(buf, pos, end, PacketType.PUBLISH, self._budget())
        else:
            props = {}
        return Publish(topic, buf[pos:end], qos, bool(flags & 1), dup, packet_id, props)

    def _decode_ack(self, kind: int, buf: bytes, pos: int, end: int) -> Packet:
        length = end - pos
        if length < 2:
            raise MalformedPacket("acknowledgement without packet identifier")
        packet_id = (buf[pos] << 8) | buf[pos + 1]
        if not packet_id:
            raise ProtocolError("packet identifier 0")
        reason = 0
        props: Properties = {}
        if self.version == MQTT_5:
            if length > 2:
                reason = buf[pos + 2]
                if reason not in _REASONS[kind]:
                    raise MalformedPacket(f"reason code {reason:#x} not valid in packet {kind}")
                if length > 3:
                    props, stop = _decode_properties(buf, pos + 3, end, kind, self._budget())
                    if stop != end:
                        raise MalformedPacket("trailing bytes after properties")
        elif length != 2:
            raise MalformedPacket("acknowledgement with trailing bytes")
        cls = (Puback, Pubrec, Pubrel, Pubcomp)[kind - 4]
        return cls(packet_id, reason, props)

    def _decode_connect(self, buf: bytes, pos: int, end: int) -> Connect:
        if self.version is not None:
            raise ProtocolError("second CONNECT on a connection")  # MQTT-3.1.0-2
        name, pos = _decode_bin(buf, pos, end)
        if pos + 4 > end:
            raise MalformedPacket("truncated CONNECT variable header")
        version = buf[pos]
        refused = None
        if name not in (b"MQTT", b"MQIsdp"):
            # MQTT-3.1.2-1: the server MAY answer CONNACK 0x84 (Unsupported Protocol Version)
            # and MUST then close the connection; it must not go on reading it as MQTT.
            refused = UnsupportedProtocolVersion(f"unknown protocol name {name!r}")
        elif version not in (MQTT_3_1, MQTT_3_1_1, MQTT_5) or _PROTOCOL_NAMES[version] != name:
            # MQTT-3.1.2-2: answer with CONNACK 0x84 / return code 1, then close.
            refused = UnsupportedProtocolVersion(f"unsupported protocol level {version}")
        if refused is not None:
            refused.protocol_level = version
            raise refused
        flags = buf[pos + 1]
        keep_alive = _unpack_u16(buf, pos + 2)[0]
        pos += 4
        if flags & 0x01:
            raise MalformedPacket("CONNECT reserved flag set")  # MQTT-3.1.2-3
        will_flag = bool(flags & 0x04)
        will_qos = (flags >> 3) & 3
        will_retain = bool(flags & 0x20)
        if not will_flag and (will_qos or will_retain):
            raise MalformedPacket("will QoS/retain set without will flag")  # MQTT-3.1.2-11/13/15
        if will_qos == 3:
            raise MalformedPacket("will QoS 3")  # MQTT-3.1.2-14
        has_user = bool(flags & 0x80)
        has_pass = bool(flags & 0x40)
        if version != MQTT_5 and has_pass and not has_user:
            raise MalformedPacket("password without user name")  # MQTT-3.1.2-22 (3.1.1)
        props: Properties = {}
        budget = self._budget()  # one allowance for the CONNECT and its will properties
        if version == MQTT_5:
            props, pos = _decode_properties(buf, pos, end, PacketType.CONNECT, budget)
        client_id, pos = _decode_str(buf, pos, end)
        will = None
        if will_flag:
            will_props: Properties = {}
            if version == MQTT_5:
                will_props, pos = _decode_properties(buf, pos, end, WILL, budget)
            will_topic, pos = _decode_str(buf, pos, end)
            will_payload, pos = _decode_bin(buf, pos, end)
            will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
        username = None
        password = None
        if has_user:
            username, pos = _decode_str(buf, pos, end)
        if has_pass:
            password, pos = _decode_bin(buf, pos, end)
        if pos != end:
            raise MalformedPacket("trailing bytes after CONNECT payload")
        self.version = version
        return Connect(
            client_id, version, bool(flags & 0x02), keep_alive, username, password, will, props
        )

    def _decode_connack(self, buf: bytes, pos: int, end: int) -> Connack:
        if end - pos < 2:
            raise MalformedPacket("truncated CONNACK")
        ack_flags = buf[pos]
        if ack_flags & 0xFE:
            raise MalformedPacket("CONNACK reserved flags set")
        reason = buf[pos + 1]
        props: Properties = {}
        if self.version == MQTT_5:
            if reason not in _REASONS[PacketType.CONNACK]:
                raise MalformedPacket(f"reason code {reason:#x} not valid in CONNACK")
            props, stop = _decode_properties(buf, pos + 2, end, PacketType.CONNACK, self._budget())
            if stop != end:
                raise MalformedPacket("trailing bytes after CONNACK properties")
        else:
            if end - pos != 2:
                raise MalformedPacket("CONNACK with trailing bytes")
            if reason not in _CONNACK_FROM_311:
                raise MalformedPacket(f"reserved CONNACK return code {reason}")  # 3.2.2.3
            reason = _CONNACK_FROM_311[reason]
        return Connack(bool(ack_flags & 1), reason, props)

    def _decode_subscribe(self, buf: bytes, pos: int, end: int) -> Subscribe:
        packet_id, pos = _decode_u16(buf, pos, end)
        if not packet_id:
            raise ProtocolError("SUBSCRIBE packet identifier 0")
        v5 = self.version == MQTT_5
        props: Properties = {}
        if v5:
            props, pos = _decode_properties(buf, pos, end, PacketType.SUBSCRIBE, self._budget())
            if len(props.get(PropertyId.SUBSCRIPTION_IDENTIFIER, ())) > 1:
                raise ProtocolError("more than one subscription identifier in SUBSCRIBE")
        subs: list[Subscription] = []
        while pos < end:
            topic_filter, pos = _decode_str(buf, pos, end)
            if pos >= end:
                raise MalformedPacket("subscription options missing")
            options = buf[pos]
            pos += 1
            qos = options & 3
            if qos == 3:
                raise MalformedPacket("subscription QoS 3")  # MQTT-3.8.3-4 (3.1.1), 3.8.3.1 (5.0)
            if v5:
                if options & 0xC0:
                    raise MalformedPacket("subscription options reserved bits set")  # MQTT-3.8.3-5
                rh = (options >> 4) & 3
                if rh == 3:
                    raise ProtocolError("retain handling 3")
                no_local = bool(options & 4)
                if no_local and topic_filter.startswith("$share/"):
                    raise ProtocolError("No Local on a shared subscription")  # MQTT-3.8.3-4
                subs.append(Subscription(topic_filter, qos, no_local, bool(options & 8), rh))
            else:
                if options & 0xFC:
                    raise MalformedPacket("SUBSCRIBE reserved bits set")  # MQTT-3.8.3-4 (3.1.1)
                subs.append(Subscription(topic_filter, qos))
        if not subs:
            raise ProtocolError("SUBSCRIBE with no topic filter")  # MQTT-3.8.3-3/-2 (3.1.1/5)
        return Subscribe(packet_id, subs, props)

    def _decode_unsubscribe(self, buf: bytes, pos: int, end: int) -> Unsubscribe:
        packet_id, pos = _decode_u16(buf, pos, end)
        if not packet_id:
            raise ProtocolError("UNSUBSCRIBE packet identifier 0")
        props: Properties = {}
        if self.version == MQTT_5:
            props, pos = _decode_properties(buf, pos, end, PacketType.UNSUBSCRIBE, self._budget())
        filters: list[str] = []
        while pos < end:
            topic_filter, pos = _decode_str(buf, pos, end)
            filters.append(topic_filter)
        if not filters:
            raise ProtocolError("UNSUBSCRIBE with no topic filter")  # MQTT-3.10.3-2
        return Unsubscribe(packet_id, filters, props)

    def _decode_suback(self, kind: int, buf: bytes, pos: int, end: int) -> Packet:
        packet_id, pos = _decode_u16(buf, pos, end)
        if not packet_id:
            raise ProtocolError("packet identifier 0")
        props: Properties = {}
        if self.version == MQTT_5:
            props, pos = _decode_properties(buf, pos, end, kind, self._budget())
            if not _REASONS[kind].issuperset(buf[pos:end]):
                raise MalformedPacket(f"reason code not valid in packet {kind}")
        elif kind == PacketType.UNSUBACK:
            if pos != end:
                raise MalformedPacket("MQTT 3.1.1 UNSUBACK carries only a packet identifier")
        elif not _SUBACK_CODES_311.issuperset(buf[pos:end]):
            raise MalformedPacket("reserved SUBACK return code")  # MQTT-3.9.3-2
        codes = list(buf[pos:end])
        if kind == PacketType.SUBACK:
            return Suback(packet_id, codes, props)
        return Unsuback(packet_id, codes, props)

    def _decode_disconnect_or_auth(self, kind: int, buf: bytes, pos: int, end: int) -> Packet:
        if self.version != MQTT_5:
            if kind == PacketType.AUTH:
                raise MalformedPacket("AUTH exists only in MQTT 5")
            if end != pos:
                raise MalformedPacket("MQTT 3.1.1 DISCONNECT carries no data")
            return Disconnect()
        reason = 0
        props: Properties = {}
        if end > pos:
            reason = buf[pos]
            if reason not in _REASONS[kind]:
                raise MalformedPacket(f"reason code {reason:#x} not valid in packet {kind}")
            if end > pos + 1:
                props, stop = _decode_properties(buf, pos + 1, end, kind, self._budget())
                if stop != end:
                    raise MalformedPacket("trailing bytes after properties")
        if kind == PacketType.DISCONNECT:
            return Disconnect(reason, props)
        return Auth(reason, props)
