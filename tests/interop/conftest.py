"""Fixtures for the interop suite: a per-test pool of real clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .clients import ClientPool


@pytest.fixture
def clients() -> Iterator[ClientPool]:
    """Creates paho / mosquitto_sub / raw clients and closes all of them after the test."""
    pool = ClientPool()
    try:
        yield pool
    finally:
        pool.close_all()
