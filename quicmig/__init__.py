"""qmig's QUIC server-migration extension on aioquic: the ground floor under broker and client.

- :mod:`quicmig.frames`: the wire format (transport parameter, four frames), sans-I/O;
- :mod:`quicmig.follower`: how a client follows a moving server, a pure state machine;
- :mod:`quicmig.connection`: the ``QuicConnection`` subclass that speaks the extension, and
  the accessors for the few aioquic internals the broker and client need;
- :mod:`quicmig.server`: aioquic's ``QuicServer`` with bounded half-open state.

It imports neither ``broker`` nor ``client``; the protocol is specified in docs/protocol.md.
"""
