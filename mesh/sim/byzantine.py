"""A byzantine injector: forged and tampered envelopes put on live sessions.

Each forgery is delivered to a live node as if one of its authenticated peers had sent
it (a compromised relay, or a man in the middle past TLS), and registered with the
checker, which fails the run if any replica ever applies one. Kinds:

* ``bad_signature`` — the next envelope of a real origin, signed with the wrong key.
* ``tampered`` — a real envelope (preferably one the target still lacks) with a field
  changed after signing, re-encoded canonically so only the signature can tell.
* ``unenrolled`` — a well-signed envelope from a node without a certificate.
* ``wrong_store`` — an envelope for another store.
* ``forbidden`` — signed with a *valid, enrolled* register key ("mallory"), but writing
  what a register may not: another node's counter entry, or the catalog.
* ``garbage`` — bytes that are no envelope at all.

Invariants:
 1. Every random choice comes from the injector's own ``random.Random``.
 2. The injector never changes a node, link or disk; it only adds messages.
"""

from __future__ import annotations

import base64
import random

import orjson

from mesh.core.envelope import Envelope, decode, seal
from mesh.core.identity import NodeKey, issue_certificate
from mesh.core.sync import encode_batch
from mesh.sim.checker import Checker
from mesh.sim.scenario import ByzantineSpec
from mesh.sim.world import SimNode, World

__all__ = ["MALLORY", "Injector"]

MALLORY = "mallory"
_PREFIX = b'{"body":'
_SUFFIX_LEN = len(b',"sig":"') + 128 + len(b'"}')


class Injector:
    def __init__(self, world: World, spec: ByzantineSpec, rng: random.Random,
                 checker: Checker, start_ms: float, end_ms: float) -> None:
        self.world = world
        self.spec = spec
        self.rng = rng
        self.checker = checker
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.attacker = NodeKey.from_bytes(rng.randbytes(32))
        self.mallory = NodeKey.from_bytes(rng.randbytes(32))
        self.injected: dict[str, int] = {}
        self.stopped = False
        self._n = 0
        if "forbidden" in spec.kinds:
            cert = issue_certificate(world.store_key, node_id=MALLORY, store_id=world.store_id,
                                     role="register", public_key=self.mallory.public_key,
                                     not_after=world.start_ms + 10 * 365 * 24 * 3600 * 1000)
            for node in world.nodes.values():
                node.trust.add_certificate(cert)

    def start(self) -> None:
        if self.spec.rate_per_min > 0 and self.spec.kinds:
            self._next(self.start_ms)

    def stop(self) -> None:
        self.stopped = True

    def _next(self, after: float) -> None:
        t = after + self.rng.expovariate(self.spec.rate_per_min / 60_000.0)
        if t < self.end_ms:
            self.world.at(t, self._fire)

    def _fire(self) -> None:
        if self.stopped:
            return
        self._inject_one()
        self._next(self.world.now)

    def _inject_one(self) -> None:
        live = [n for n in self.world.nodes.values() if n.alive]
        if not live:
            return
        dst = self.rng.choice(live)
        peers = [p for p in self.world.nodes if p != dst.node_id and dst.core.is_up(p)]
        kind = self.rng.choice(self.spec.kinds)
        if not peers:
            return
        src = self.rng.choice(peers)
        self._n += 1
        data = self._forge(kind, dst)
        self.injected[kind] = self.injected.get(kind, 0) + 1
        self.world.inject(src, dst.node_id, data)

    # --- forgeries -----------------------------------------------------------------------------

    def _register(self, env: Envelope) -> bytes:
        self.checker.forged[env.hash] = (env.origin, env.seq)
        return encode_batch([env.raw])

    def _hlc(self, node: SimNode) -> int:
        return node.clock() << 16

    def _forge(self, kind: str, dst: SimNode) -> bytes:
        real = list(self.world.nodes)
        origin = self.rng.choice(real)
        seq = dst.replica.vv.get(origin) + 1
        sku = f"FORGED-{self._n}"
        op = {"t": "pn", "sku": sku, "r": origin, "p": 1_000_000, "n": 0}
        meta = {"kind": "receipt", "txn": f"forged-{self._n}", "sku": sku, "qty": 1_000_000}
        if kind == "bad_signature":
            env = seal(self.attacker, store=self.world.store_id, origin=origin, seq=seq,
                       prev=dst.replica.head(origin), hlc=self._hlc(dst), ops=[op], meta=meta)
            return self._register(env)
        if kind == "wrong_store":
            env = seal(self.attacker, store="another-store", origin=origin, seq=seq,
                       prev=dst.replica.head(origin), hlc=self._hlc(dst), ops=[op], meta=meta)
            return self._register(env)
        if kind == "unenrolled":
            op = {**op, "r": "intruder"}
            env = seal(self.attacker, store=self.world.store_id, origin="intruder", seq=1,
                       prev=None, hlc=self._hlc(dst), ops=[op], meta=meta)
            return self._register(env)
        if kind == "forbidden":
            if self.rng.random() < 0.5:
                ops = [{**op, "r": origin}]  # writes another node's counter entry
            else:
                ops = [{"t": "cat", "u": base64.b64encode(b"\x00\x00").decode()}]
                meta = {"kind": "catalog", "txn": f"forged-{self._n}"}
            env = seal(self.mallory, store=self.world.store_id, origin=MALLORY, seq=1,
                       prev=None, hlc=self._hlc(dst), ops=ops, meta=meta)
            return self._register(env)
        if kind == "tampered":
            page = self._victim(dst)
            if page:
                # A page of genuine envelopes the target lacks whose last one was altered:
                # the one-signature page check must fail and the genuine prefix survive.
                forged = decode(_tamper(page[-1]))
                self.checker.forged[forged.hash] = (forged.origin, forged.seq)
                return encode_batch([*page[:-1], forged.raw])
        # garbage, or nothing to tamper with yet
        return encode_batch([self.rng.randbytes(self.rng.randint(1, 600))])

    def _victim(self, dst: SimNode) -> list[bytes]:
        """Up to four durable envelopes of one origin that ``dst`` lacks (from its next
        seq on), else one durable envelope it already holds."""
        nodes = list(self.world.nodes.values())
        self.rng.shuffle(nodes)
        for n in nodes:
            chain = n.disk.by_origin.get(n.node_id, [])
            have = dst.replica.vv.get(n.node_id)
            if len(chain) > have:
                return chain[have : have + self.rng.randint(1, 4)]
        for n in nodes:
            chain = n.disk.by_origin.get(n.node_id, [])
            if chain:
                return [self.rng.choice(chain)]
        return []


def _tamper(raw: bytes) -> bytes:
    """Change one field of a signed envelope and re-encode it canonically, keeping the
    signature: structurally perfect, cryptographically wrong."""
    body = orjson.loads(raw[len(_PREFIX):-_SUFFIX_LEN])
    meta = body["meta"]
    meta["txn"] = str(meta["txn"]) + "x"
    for op in body["ops"]:
        if op.get("t") == "pn":
            op["n"] = op["n"] + 1  # one more unit sold than was signed for
            break
    new_body = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return _PREFIX + new_body + raw[-_SUFFIX_LEN:]
