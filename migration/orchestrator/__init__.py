"""The orchestrator (issue #17): moves brokers between edge hosts when asked.

One concern per module: :mod:`.inventory` (the YAML of hosts and brokers), :mod:`.core`
(the decisions, sans I/O, its rules at the top), :mod:`.queue` (its state on disk),
:mod:`.audit` (the append-only log), :mod:`.executor` (how a move is made: the lab's
:class:`~migration.lab.live.Migration`), :mod:`.service` (threads and locking),
:mod:`.api` (HTTP, tokens), :mod:`.metrics` (Prometheus), :mod:`.cli` (``qmig orchestrate``).
"""
