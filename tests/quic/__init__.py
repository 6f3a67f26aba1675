"""End-to-end tests of qmig's MQTT-over-QUIC transport, CLI and TCP-to-QUIC bridge."""
