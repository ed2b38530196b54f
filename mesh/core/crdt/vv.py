"""Version vectors: per origin, the highest contiguous sequence number held.

Invariants:

1. Every stored entry maps a ``str`` origin to an ``int`` seq >= 1; an origin that is
   absent has seq 0, and zeros are never stored (so equal vectors have equal dicts).
2. Entries only grow: ``advance`` moves one origin by exactly one, ``set`` and
   ``merge`` never lower an entry. A vector is therefore a join-semilattice under
   ``merge`` (pointwise max): commutative, associative, idempotent.
3. ``total()`` always equals the sum of the entries (cached, updated on every change).
4. Input from outside (``from_dict``) is validated before any state is built; bad input
   raises ``ValueError`` and never yields a partially valid vector.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, Mapping

__all__ = ["VersionVector"]

_STR = {str}
_INT = {int}


def _check_entry(origin: object, seq: object) -> None:
    if not isinstance(origin, str):
        raise ValueError(f"version vector origin must be a str, got {type(origin).__name__}")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError(f"version vector seq for {origin!r} must be an int, got {seq!r}")
    if seq < 0:
        raise ValueError(f"version vector seq for {origin!r} must be >= 0, got {seq}")


class VersionVector:
    """Mutable map origin -> highest contiguous seq held (0 when absent)."""

    __slots__ = ("_total", "_v")

    def __init__(self, entries: Mapping[str, int] | None = None) -> None:
        self._v: dict[str, int] = {}
        self._total = 0
        if entries:
            v = dict(entries)
            # Validate in C (map/set/min) first; on any doubt, entry by entry, so the
            # error names the bad entry. Summaries of 40+ origins arrive many times a
            # second in a big store.
            if (set(map(type, v)) <= _STR and set(map(type, v.values())) <= _INT
                    and min(v.values()) >= 0):
                if 0 in v.values():
                    v = {o: q for o, q in v.items() if q}
                self._v = v
                self._total = sum(v.values())
                return
            for origin, seq in v.items():
                _check_entry(origin, seq)
                if seq:
                    self._v[origin] = seq
                    self._total += seq

    # -- reading -------------------------------------------------------------------

    def get(self, origin: str) -> int:
        """Highest contiguous seq held for ``origin`` (0 if none)."""
        return self._v.get(origin, 0)

    def __getitem__(self, origin: str) -> int:
        return self._v.get(origin, 0)

    def items(self) -> ItemsView[str, int]:
        """Read-only view of the non-zero entries."""
        return self._v.items()

    def view(self) -> Mapping[str, int]:
        """The entries as a read-only mapping (no copy: for hot loops; never mutate)."""
        return self._v

    def origins(self) -> set[str]:
        """The origins with a non-zero entry, as a new set."""
        return set(self._v)

    def __iter__(self) -> Iterator[str]:
        return iter(self._v)

    def __len__(self) -> int:
        return len(self._v)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VersionVector):
            return NotImplemented
        return self._v == other._v

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"VersionVector({self._v!r})"

    def total(self) -> int:
        """Sum of the entries: the number of envelopes this vector covers."""
        return self._total

    def dominates(self, other: VersionVector) -> bool:
        """True when ``self >= other`` pointwise (self has everything other has)."""
        v = self._v
        for origin, seq in other._v.items():
            if v.get(origin, 0) < seq:
                return False
        return True

    def missing_from(self, other: VersionVector) -> dict[str, tuple[int, int]]:
        """What ``other`` holds that ``self`` lacks: ``{origin: (first, last)}`` inclusive.

        Only origins where ``other`` is ahead appear.
        """
        v = self._v
        out: dict[str, tuple[int, int]] = {}
        for origin, seq in other._v.items():
            mine = v.get(origin, 0)
            if seq > mine:
                out[origin] = (mine + 1, seq)
        return out

    # -- writing -------------------------------------------------------------------

    def advance(self, origin: str, seq: int) -> None:
        """Record ``seq`` for ``origin``; it must be exactly the next one."""
        if not isinstance(origin, str):
            raise ValueError(f"version vector origin must be a str, got {type(origin).__name__}")
        current = self._v.get(origin, 0)
        if seq != current + 1 or isinstance(seq, bool) or not isinstance(seq, int):
            raise ValueError(f"cannot advance {origin!r} to {seq!r}: next seq is {current + 1}")
        self._v[origin] = seq
        self._total += 1

    def set(self, origin: str, seq: int) -> None:
        """Raise ``origin`` to ``seq``; lowering is refused with ``ValueError``."""
        _check_entry(origin, seq)
        current = self._v.get(origin, 0)
        if seq < current:
            raise ValueError(f"cannot lower {origin!r} from {current} to {seq}")
        if seq > current:
            self._v[origin] = seq
            self._total += seq - current

    def merge(self, other: VersionVector) -> VersionVector:
        """In-place pointwise max with ``other``; returns ``self``."""
        v = self._v
        for origin, seq in other._v.items():
            current = v.get(origin, 0)
            if seq > current:
                v[origin] = seq
                self._total += seq - current
        return self

    def copy(self) -> VersionVector:
        new = VersionVector.__new__(VersionVector)
        new._v = self._v.copy()
        new._total = self._total
        return new

    # -- wire form -----------------------------------------------------------------

    def to_dict(self) -> dict[str, int]:
        return self._v.copy()

    @classmethod
    def from_dict(cls, d: object) -> VersionVector:
        """Build from ``{origin: seq}``; ``ValueError`` on anything else."""
        if not isinstance(d, dict):
            raise ValueError(f"version vector must be a dict, got {type(d).__name__}")
        return cls(d)  # __init__ validates every entry
