"""Child process of the cross-process discovery test (tests/node/test_discovery.py).

Usage::

    python tests/discovery_child.py STORE_ID NODE_ID PORT

Runs one ``Discovery`` bound to 127.0.0.1 (never any other interface) until its stdin
is closed, then closes it (goodbye packets) and exits with status 0.

Protocol on stdout, one line each, flushed:

* ``READY <service name>`` once ``start()`` returned,
* ``PEER <node id> <host> <port> <role> <fingerprint>`` for every ``on_peer``,
* ``LOST <node id>`` for every ``on_lost``,
* ``CLOSED`` after ``close()`` returned.
"""

from __future__ import annotations

import asyncio
import sys

from mesh.net.discovery import Discovery, PeerInfo


def emit(*words: object) -> None:
    print(*words, flush=True)


async def main(store_id: str, node_id: str, port: int) -> None:
    def on_peer(peer: PeerInfo) -> None:
        emit("PEER", peer.node_id, peer.host, peer.port, peer.role, peer.fingerprint)

    def on_lost(lost: str) -> None:
        emit("LOST", lost)

    disc = Discovery(store_id=store_id, node_id=node_id, role="register",
                     fingerprint=f"fp-{node_id}", port=port, interface="127.0.0.1",
                     on_peer=on_peer, on_lost=on_lost)
    await disc.start()
    emit("READY", disc.service_name)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        await stdin.read()  # until the parent closes our stdin
    finally:
        transport.close()
        await disc.close()
    emit("CLOSED")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
