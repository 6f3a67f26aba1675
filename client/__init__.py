"""qmig's asyncio MQTT client (arrives with the MQTT-over-QUIC issue)."""
