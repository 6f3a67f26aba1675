"""qmig's MQTT broker: a sans-I/O engine (sessions, routing, QoS) driven by asyncio listeners."""

__version__ = "0.1.0"  # qmig's version; pyproject.toml names the same (tests/test_cli.py checks)
