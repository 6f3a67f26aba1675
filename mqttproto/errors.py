"""Errors raised by the sans-I/O layer, each carrying the MQTT 5 reason code to close with."""

from __future__ import annotations

from typing import Any

from .reasons import ReasonCode


class MQTTError(Exception):
    """A violation that ends the connection with ``reason_code`` (section 4.13)."""

    reason_code: ReasonCode = ReasonCode.UNSPECIFIED_ERROR
    # Set by PacketReader.feed: the valid packets that came before the bad one.
    decoded: list[Any]

    def __init__(self, message: str, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.decoded = []
        if reason_code is not None:
            self.reason_code = ReasonCode(reason_code)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class MalformedPacket(MQTTError):
    reason_code = ReasonCode.MALFORMED_PACKET


class ProtocolError(MQTTError):
    reason_code = ReasonCode.PROTOCOL_ERROR


class PacketTooLarge(MQTTError):
    reason_code = ReasonCode.PACKET_TOO_LARGE


class UnsupportedProtocolVersion(MQTTError):
    reason_code = ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
    # The Protocol Level byte of the refused CONNECT, so that a server can answer in the
    # CONNACK format that client most likely reads (None when unknown).
    protocol_level: int | None = None
