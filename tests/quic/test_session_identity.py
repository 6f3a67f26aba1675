"""Finding 3 of issue #13: a session belongs to the user that made it, on every transport.

With a password file and an ACL, alice connecting with bob's client id and Clean Start 0 used
to get session present = 1 and bob's queued messages on ``bob/inbox`` (which her ACL
forbids).  Now another user's CONNECT for that client id is refused with Not authorized
(0x87): she can neither resume bob's session, nor take over his live connection, nor discard
his session with Clean Start; bob's queue waits for bob, whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.auth import add_user
from client.client import Client, ClientError
from mqttproto.reasons import ReasonCode

from .conftest import QBroker, free_tcp_port, free_udp_port

pytestmark = pytest.mark.timeout(60)
TRANSPORTS = ("tcp", "tls", "quic")
USERS = {"alice": "wonderland", "bob": "builder", "admin": "root-of-trust"}
ACL = """\
user alice
topic readwrite alice/#
user bob
topic readwrite bob/#
user admin
topic write bob/#
"""


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QBroker]:
    from broker.certs import make_lab_certs

    work = tmp_path_factory.mktemp("identity")
    certs = make_lab_certs(work / "certs")
    passwd = work / "passwd"
    for user, password in USERS.items():
        add_user(passwd, user, password)
    acl = work / "acl"
    acl.write_text(ACL)
    broker = QBroker(
        ca=str(certs.ca_cert),
        cert=str(certs.server_cert),
        key=str(certs.server_key),
        log_path=work / "broker.log",
        ports={t: free_tcp_port() for t in ("tcp", "tls", "mptcp")} | {"quic": free_udp_port()},
        extra_args=["--password-file", str(passwd), "--acl-file", str(acl)],
    )
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


def _client(
    broker: QBroker, transport: str, user: str, client_id: str, clean_start: bool = False
) -> Client:
    return Client(
        "127.0.0.1", broker.port(transport), transport=transport, cafile=broker.ca,
        client_id=client_id, username=user, password=USERS[user], reconnect=False,
        clean_start=clean_start, session_expiry=300, connect_timeout=5.0,
    )  # fmt: skip


async def _refused(client: Client) -> int | None:
    with pytest.raises(ClientError) as caught:
        await client.connect()
    await client.disconnect()
    return caught.value.reason_code


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_another_user_cannot_resume_a_session_or_read_its_queue(
    auth_broker: QBroker, transport: str
) -> None:
    device = f"bob-device-{transport}"
    async with _client(auth_broker, transport, "bob", device) as bob:
        await bob.subscribe("bob/inbox", qos=1)
    async with _client(auth_broker, transport, "admin", f"admin-{transport}") as admin:
        for n in range(3):
            await admin.publish("bob/inbox", f"secret {n}".encode(), qos=1)

    assert await _refused(_client(auth_broker, transport, "alice", device)) == (
        ReasonCode.NOT_AUTHORIZED
    )
    # Clean Start would discard bob's session: refused as well.
    assert (
        await _refused(_client(auth_broker, transport, "alice", device, clean_start=True))
        == ReasonCode.NOT_AUTHORIZED
    )

    async with _client(auth_broker, transport, "bob", device) as bob:
        assert bob.session_present
        got = [(await bob.next_message(timeout=5)).payload for _ in range(3)]
        assert got == [b"secret 0", b"secret 1", b"secret 2"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_another_user_cannot_take_over_a_live_connection(
    auth_broker: QBroker, transport: str
) -> None:
    device = f"bob-live-{transport}"
    async with _client(auth_broker, transport, "bob", device) as bob:
        await bob.subscribe("bob/live", qos=1)
        assert await _refused(_client(auth_broker, transport, "alice", device)) == (
            ReasonCode.NOT_AUTHORIZED
        )
        assert bob.connected
        await bob.publish("bob/live", b"still mine", qos=1)
        assert (await bob.next_message(timeout=5)).payload == b"still mine"
