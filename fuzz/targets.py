"""The fuzz targets: each takes bytes and may raise only the error its parser documents.

Every target is a pure function over one input, so that atheris (libFuzzer) can call it
millions of times in one process; anything else it raises, and any hang, is a finding.

- ``mqtt``: the broker's decoder (:class:`mqttproto.codec.PacketReader`, both protocol
  versions, the input fed in two pieces), then the encoder on whatever it decoded;
- ``frames``: qmig's QUIC migration frames and transport parameter (:mod:`quicmig.frames`);
- ``control``: a control-API request line (:func:`broker.control.parse_request` and
  :func:`broker.control.check_arguments`);
- ``config``: a YAML settings file (:func:`broker.config.parse_settings`) and validation of
  the settings it yields (file-system settings left out: a fuzzer must not write files).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

from broker.config import BrokerConfig, ConfigError, parse_settings
from broker.control import COMMANDS, BadRequest, check_arguments, parse_request
from mqttproto.codec import PacketReader, encode
from mqttproto.errors import MQTTError
from mqttproto.packets import MQTT_3_1_1, MQTT_5
from quicmig.frames import FrameError, decode, encode_transport_parameter, find_transport_parameter
from quicmig.frames import encode as encode_frame

MAX_PACKET = 64 * 1024  # the decoder's Maximum Packet Size for the fuzzer: inputs stay small
_FILE_SETTINGS = ("cert", "key", "cafile", "password_file", "acl_file", "control_token_file")


def mqtt(data: bytes) -> None:
    if not data:
        return
    version = MQTT_5 if data[0] & 1 else MQTT_3_1_1
    body = data[1:]
    cut = len(body) // 2
    reader = PacketReader(version, MAX_PACKET, 256, 65536)
    try:
        packets = reader.feed(body[:cut]) + reader.feed(body[cut:])
    except MQTTError:
        return
    for packet in packets:
        # A value the encoder refuses to send (a reason code of the other version) is fine.
        with contextlib.suppress(MQTTError, ValueError):
            encode(packet, version)


def frames(data: bytes) -> None:
    if data[:1] == b"\x00":  # the transport parameter's side of the extension
        strategies = find_transport_parameter(data[1:])
        if strategies is not None:
            assert find_transport_parameter(encode_transport_parameter(strategies)) == strategies
        return
    try:
        frame = decode(data)
    except FrameError:
        return
    assert decode(encode_frame(frame)) == frame  # what was read is written back the same


def control(data: bytes) -> None:
    try:
        request = parse_request(data)
    except BadRequest:
        return
    cmd = request.get("cmd")
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        return
    with contextlib.suppress(BadRequest):
        check_arguments(cmd, request)


def config(data: bytes) -> None:
    try:
        values = parse_settings(data.decode("utf-8", "replace"), "fuzzed config")
    except ConfigError:
        return
    for name in _FILE_SETTINGS:
        values.pop(name, None)
    values.pop("control_port", None)  # a control port without a token generates a file
    with contextlib.suppress(ConfigError):
        dataclasses.replace(BrokerConfig(), **values).validate()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "mqtt": mqtt,
    "frames": frames,
    "control": control,
    "config": config,
}
