"""The broker's ``precopy`` control step keeps its collector off the memory being copied.

A full collection writes to the header of every object it traverses, which makes every page
of the heap differ from the last pre-copy round.  ``gc.freeze()`` for the rounds, undone by
``restored`` and by ``rollback``, on the real broker's migration API.
"""

from __future__ import annotations

import gc

from broker.config import BrokerConfig
from broker.server import BrokerServer
from quicmig.frames import Address


async def test_precopy_freezes_the_collector_until_the_move_ends_either_way() -> None:
    config = BrokerConfig(host="127.0.0.1", tcp_port=0, tls_port=0, mptcp_port=0,
                          quic_port=0, sys_interval=0).validate()  # fmt: skip
    server = BrokerServer(config)
    await server.start()
    try:
        assert gc.get_freeze_count() == 0
        result = server.migration.precopy()
        assert result["gc_frozen"] == gc.get_freeze_count() > 1000
        await server.migration.restored(Address("127.0.0.1", 14567))
        assert gc.get_freeze_count() == 0
        server.migration.precopy()
        await server.migration.rollback()
        assert gc.get_freeze_count() == 0
        await server.migration.rollback()  # twice: nothing frozen, nothing to undo
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        await server.stop()
