"""Interoperability / conformance tests with real MQTT clients (paho, mosquitto, amqtt)."""
