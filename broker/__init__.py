"""qmig's MQTT broker: a sans-I/O engine (sessions, routing, QoS) driven by asyncio listeners."""
