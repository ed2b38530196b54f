"""State-based PN-counter with delta mutators.

Each replica owns one ``(P, N)`` pair: P counts its increments, N its decrements, both
cumulative. Only the owner raises its own pair; everyone else learns it by join.

Invariants:

1. Every stored P and N entry is an ``int`` >= 1 keyed by a ``str`` replica id; zeros
   are never stored, so equal states have equal dicts.
2. Entries only grow. Join is pointwise max of P and of N, hence commutative,
   associative and idempotent: a delta applied twice, late or out of order changes
   nothing it should not.
3. A delta from ``increment``/``decrement`` holds exactly one entry, the owner's
   cumulative P (or N) after the change, so it is self-contained.
4. ``value`` always equals ``sum(P) - sum(N)``; it is cached and kept up to date by
   every mutator and by ``merge``, so reading it is O(1).
5. Input from outside (``from_dict``) is validated before any state is built; bad input
   raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["PNCounter"]


def _check_amount(n: object) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"amount must be an int > 0, got {n!r}")
    return n


def _check_replica(replica: object) -> str:
    if not isinstance(replica, str):
        raise TypeError(f"replica id must be a str, got {type(replica).__name__}")
    return replica


def _validated(side: str, m: object) -> dict[str, int]:
    """Copy of ``m`` as a ``{str: int >= 0}`` dict without zeros, or ``ValueError``."""
    if not isinstance(m, Mapping):
        raise ValueError(f"PN-counter {side!r} must be a dict, got {type(m).__name__}")
    out: dict[str, int] = {}
    for replica, count in m.items():
        if not isinstance(replica, str):
            raise ValueError(f"PN-counter {side!r} key must be a str replica id, got {replica!r}")
        if not isinstance(count, int) or isinstance(count, bool):
            raise ValueError(
                f"PN-counter {side!r}[{replica!r}] must be an int, got {type(count).__name__}"
            )
        if count < 0:
            raise ValueError(f"PN-counter {side!r}[{replica!r}] must be >= 0, got {count}")
        if count:
            out[replica] = count
    return out


class PNCounter:
    """Counter that replicas increment and decrement concurrently; join = pointwise max."""

    __slots__ = ("_n", "_p", "_value")

    def __init__(
        self, p: Mapping[str, int] | None = None, n: Mapping[str, int] | None = None
    ) -> None:
        self._p: dict[str, int] = _validated("p", p) if p else {}
        self._n: dict[str, int] = _validated("n", n) if n else {}
        self._value = sum(self._p.values()) - sum(self._n.values())

    @classmethod
    def _of(cls, p: dict[str, int], n: dict[str, int], value: int) -> PNCounter:
        """Adopt already-valid dicts without copying or re-validating."""
        new = cls.__new__(cls)
        new._p = p
        new._n = n
        new._value = value
        return new

    # -- mutators (return deltas) --------------------------------------------------

    def increment(self, replica: str, n: int = 1) -> PNCounter:
        """Add ``n`` on ``replica``'s behalf; returns the delta (replica's P entry)."""
        _check_replica(replica)
        p = self._p[replica] = self._p.get(replica, 0) + _check_amount(n)
        self._value += n
        return PNCounter._of({replica: p}, {}, p)

    def decrement(self, replica: str, n: int = 1) -> PNCounter:
        """Subtract ``n`` on ``replica``'s behalf; returns the delta (replica's N entry)."""
        _check_replica(replica)
        m = self._n[replica] = self._n.get(replica, 0) + _check_amount(n)
        self._value -= n
        return PNCounter._of({}, {replica: m}, -m)

    def merge(self, other: PNCounter) -> PNCounter:
        """In-place join (pointwise max of P and N); returns ``self``."""
        p = self._p
        for replica, count in other._p.items():
            current = p.get(replica, 0)
            if count > current:
                p[replica] = count
                self._value += count - current
        n = self._n
        for replica, count in other._n.items():
            current = n.get(replica, 0)
            if count > current:
                n[replica] = count
                self._value -= count - current
        return self

    def join_entry(self, replica: str, p: int, n: int) -> PNCounter:
        """Join one replica's (P, N) entry: ``merge`` of a one-entry delta without
        building it (the replica's hot path; inputs were validated by the op schema)."""
        cp = self._p.get(replica, 0)
        if p > cp:
            self._p[replica] = p
            self._value += p - cp
        cn = self._n.get(replica, 0)
        if n > cn:
            self._n[replica] = n
            self._value -= n - cn
        return self

    # -- reading -------------------------------------------------------------------

    @property
    def value(self) -> int:
        """``sum(P) - sum(N)``, O(1)."""
        return self._value

    def entry(self, replica: str) -> tuple[int, int]:
        """``(P, N)`` of ``replica``; ``(0, 0)`` if it never changed the counter."""
        return self._p.get(replica, 0), self._n.get(replica, 0)

    def replicas(self) -> set[str]:
        """Replicas with a non-zero P or N entry."""
        return self._p.keys() | self._n.keys()

    def copy(self) -> PNCounter:
        return PNCounter._of(self._p.copy(), self._n.copy(), self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PNCounter):
            return NotImplemented
        return self._p == other._p and self._n == other._n

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"PNCounter(p={self._p!r}, n={self._n!r})"

    # -- wire form -----------------------------------------------------------------

    def to_dict(self) -> dict[str, dict[str, int]]:
        """``{"p": {...}, "n": {...}}`` with only non-zero entries."""
        return {"p": self._p.copy(), "n": self._n.copy()}

    @classmethod
    def from_dict(cls, d: object) -> PNCounter:
        """Inverse of ``to_dict``; ``ValueError`` on anything malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"PN-counter must be a dict, got {type(d).__name__}")
        if d.keys() != {"p", "n"}:
            raise ValueError(
                f"PN-counter must have exactly keys 'p' and 'n', got {sorted(map(repr, d))}"
            )
        p = _validated("p", d["p"])
        n = _validated("n", d["n"])
        return cls._of(p, n, sum(p.values()) - sum(n.values()))
