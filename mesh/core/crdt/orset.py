"""Dots, compact causal contexts and the add-wins observed-remove set.

The OR-set is the "optimized add-wins OR-set" of Almeida, Shoker and Baquero, "Delta
state replicated data types" (2018): each element carries the dots of the adds that
created it, and a causal context records every dot the replica has seen. A dot that
is in the context but no longer in the entries was removed; a join keeps a dot unless
the other side has seen it and dropped it. Hence a remove only removes the adds it
observed, and a concurrent add wins.

Invariants:

1. A dot is ``(replica, counter)`` with ``replica`` a ``str`` and ``counter`` an
   ``int`` >= 1; it names exactly one add, on exactly one element.
2. A ``CausalContext`` is kept compact: no cloud dot ``(r, c)`` has
   ``c <= vv[r] + 1`` (covered dots are dropped, contiguous ones folded into the
   vector). So two contexts holding the same set of dots are equal field by field.
3. Every dot in an ``ORSet``'s entries is in its context, no element has an empty dot
   set, and no dot is listed under two elements (``_index`` maps each live dot to its
   element and always mirrors the entries).
4. Joins (``CausalContext.merge``, ``ORSet.merge``) are commutative, associative and
   idempotent, so deltas may be applied in any order, late or twice.
5. A delta returned by ``add``/``remove`` is itself a valid ``ORSet`` (invariant 3)
   that shares no mutable state with the replica it came from.
6. Input from outside (``from_dict``) is validated before any state is built; bad input
   raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from mesh.core.crdt.vv import VersionVector

__all__ = ["CausalContext", "Dot", "ORSet"]

Dot = tuple[str, int]
"""``(replica id, counter >= 1)``: the identity of one event."""


def _check_dot(dot: object) -> Dot:
    """``dot`` (a 2-tuple or 2-list, as JSON gives it) as a ``Dot``, or ``ValueError``."""
    if not isinstance(dot, tuple | list) or len(dot) != 2:
        raise ValueError(f"dot must be a [replica, counter] pair, got {dot!r}")
    replica, counter = dot
    if not isinstance(replica, str):
        raise ValueError(f"dot replica must be a str, got {replica!r}")
    if not isinstance(counter, int) or isinstance(counter, bool) or counter < 1:
        raise ValueError(f"dot counter must be an int >= 1, got {counter!r}")
    return (replica, counter)


def _check_keys(d: object, what: str, keys: set[str]) -> dict[str, object]:
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a dict, got {type(d).__name__}")
    if d.keys() != keys:
        raise ValueError(
            f"{what} must have exactly keys {sorted(keys)}, got {sorted(map(repr, d))}"
        )
    return d


def _sorted_dots(dots: Iterable[Dot]) -> list[list[str | int]]:
    return [[r, c] for r, c in sorted(dots)]


class CausalContext:
    """Set of seen dots, stored as a version vector plus the dots beyond it (the cloud)."""

    __slots__ = ("_cloud", "_vv")

    def __init__(self, vv: VersionVector | None = None, cloud: Iterable[Dot] = ()) -> None:
        self._vv = vv.copy() if vv is not None else VersionVector()
        self._cloud: set[Dot] = {_check_dot(d) for d in cloud}
        self.compact()

    @classmethod
    def _of(cls, vv: VersionVector, cloud: set[Dot]) -> CausalContext:
        """Adopt ``vv`` and ``cloud`` (no copy, no validation); caller compacts."""
        new = cls.__new__(cls)
        new._vv = vv
        new._cloud = cloud
        return new

    # -- reading -------------------------------------------------------------------

    @property
    def vv(self) -> VersionVector:
        """The contiguous part. Read-only: mutating it would break invariant 2."""
        return self._vv

    @property
    def cloud(self) -> frozenset[Dot]:
        """Seen dots not covered by ``vv``."""
        return frozenset(self._cloud)

    def contains(self, dot: Dot) -> bool:
        """True if ``dot`` has been seen."""
        return dot[1] <= self._vv._v.get(dot[0], 0) or dot in self._cloud

    def __contains__(self, dot: object) -> bool:
        if not isinstance(dot, tuple) or len(dot) != 2:
            return False
        replica, counter = dot
        if not isinstance(replica, str) or not isinstance(counter, int):
            return False
        return self.contains((replica, counter))

    def _size(self) -> int:
        """Number of dots held."""
        return self._vv.total() + len(self._cloud)

    def _iter_dots(self) -> Iterator[Dot]:
        for replica, seq in self._vv.items():
            for counter in range(1, seq + 1):
                yield (replica, counter)
        yield from self._cloud

    def _is_empty(self) -> bool:
        return not self._vv._v and not self._cloud

    # -- writing -------------------------------------------------------------------

    def add(self, dot: Dot) -> None:
        """Record ``dot`` as seen (the context stays compact)."""
        self._add(_check_dot(dot))

    def _add(self, dot: Dot) -> None:
        replica, counter = dot
        current = self._vv.get(replica)
        if counter <= current:
            return
        if counter > current + 1:
            self._cloud.add(dot)
            return
        cloud = self._cloud
        if cloud:  # fold the run of cloud dots that now continues the vector
            while (replica, counter + 1) in cloud:
                counter += 1
                cloud.remove((replica, counter))
        self._vv.set(replica, counter)

    def next_dot(self, replica: str) -> Dot:
        """A fresh dot for ``replica``'s next event, recorded as seen."""
        if not isinstance(replica, str):
            raise TypeError(f"replica id must be a str, got {type(replica).__name__}")
        dot = (replica, self._vv.get(replica) + 1)
        self._add(dot)
        return dot

    def merge(self, other: CausalContext) -> CausalContext:
        """In-place union with ``other`` (kept compact); returns ``self``."""
        if other is self:
            return self
        before = self._vv.total()
        self._vv.merge(other._vv)
        if self._cloud and self._vv.total() != before:
            self.compact()
        for dot in other._cloud:
            self._add(dot)
        return self

    def compact(self) -> None:
        """Drop cloud dots covered by ``vv`` and fold contiguous ones into it."""
        cloud = self._cloud
        if not cloud:
            return
        vv = self._vv
        keep: set[Dot] = set()
        for dot in sorted(cloud):  # ascending per replica, so runs fold in one pass
            replica, counter = dot
            current = vv.get(replica)
            if counter == current + 1:
                vv.set(replica, counter)
            elif counter > current:
                keep.add(dot)
        self._cloud = keep

    def copy(self) -> CausalContext:
        return CausalContext._of(self._vv.copy(), self._cloud.copy())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CausalContext):
            return NotImplemented
        return self._vv == other._vv and self._cloud == other._cloud

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"CausalContext(vv={self._vv.to_dict()!r}, cloud={_sorted_dots(self._cloud)!r})"

    # -- wire form -----------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        """``{"vv": {...}, "cloud": [[replica, counter], ...]}``, cloud sorted."""
        return {"vv": self._vv.to_dict(), "cloud": _sorted_dots(self._cloud)}

    @classmethod
    def from_dict(cls, d: object) -> CausalContext:
        """Inverse of ``to_dict``; ``ValueError`` on anything malformed."""
        d = _check_keys(d, "causal context", {"vv", "cloud"})
        vv = VersionVector.from_dict(d["vv"])
        cloud = d["cloud"]
        if not isinstance(cloud, list):
            raise ValueError(f"causal context cloud must be a list, got {type(cloud).__name__}")
        ctx = cls._of(vv, {_check_dot(dot) for dot in cloud})
        ctx.compact()
        return ctx


class ORSet:
    """Add-wins observed-remove set of ``str`` elements with delta mutators."""

    __slots__ = ("_ctx", "_entries", "_index")

    def __init__(self) -> None:
        self._entries: dict[str, set[Dot]] = {}
        self._index: dict[Dot, str] = {}
        self._ctx = CausalContext()

    @classmethod
    def _of(cls, entries: dict[str, set[Dot]], ctx: CausalContext) -> ORSet:
        """Adopt ``entries`` and ``ctx`` (no copy); builds the dot index."""
        new = cls.__new__(cls)
        new._entries = entries
        new._index = {dot: element for element, dots in entries.items() for dot in dots}
        new._ctx = ctx
        return new

    # -- mutators (return deltas) --------------------------------------------------

    def add(self, replica: str, element: str) -> ORSet:
        """Add ``element`` with a fresh dot of ``replica``; returns the delta.

        The delta's context also holds the dots ``element`` had: the new add
        supersedes them, so the element carries one dot per replica lineage.
        """
        if not isinstance(element, str):
            raise TypeError(f"OR-set element must be a str, got {type(element).__name__}")
        dot = self._ctx.next_dot(replica)
        index = self._index
        old = self._entries.get(element)
        self._entries[element] = {dot}
        index[dot] = element
        delta_cloud = {dot}
        if old:
            for d in old:
                del index[d]
            delta_cloud |= old
        delta_ctx = CausalContext._of(VersionVector(), delta_cloud)
        delta_ctx.compact()
        return ORSet._of({element: {dot}}, delta_ctx)

    def remove(self, element: str) -> ORSet:
        """Remove the adds of ``element`` seen here; returns the delta (maybe empty)."""
        old = self._entries.pop(element, None) if isinstance(element, str) else None
        if not old:
            return ORSet()
        index = self._index
        for d in old:
            del index[d]
        delta_ctx = CausalContext._of(VersionVector(), old)  # old is no longer ours
        delta_ctx.compact()
        return ORSet._of({}, delta_ctx)

    def merge(self, other: ORSet) -> ORSet:
        """In-place join with ``other``; returns ``self``.

        Per element keeps ``(s1 & s2) | (s1 - c2) | (s2 - c1)``; contexts are united.
        Cost is about the size of ``other`` (plus the smaller of ``other``'s context
        and this set), so applying a small delta to a large replica is cheap.
        """
        if other is self:
            return self
        entries, index = self._entries, self._index
        c1, c2 = self._ctx, other._ctx
        other_entries = other._entries
        # 1. Our dots that ``other`` has seen but no longer holds were removed there.
        if index:
            if c2._size() <= len(index):
                seen = [d for d in c2._iter_dots() if d in index]
            else:
                seen = [d for d in index if c2.contains(d)]
            for dot in seen:
                element = index[dot]
                if dot in other_entries.get(element, ()):
                    continue
                del index[dot]
                held = entries[element]
                held.discard(dot)
                if not held:
                    del entries[element]
        # 2. Dots of ``other`` that we have never seen are new adds.
        for element, other_dots in other_entries.items():
            for dot in other_dots:
                if not c1.contains(dot):
                    mine = entries.get(element)
                    if mine is None:
                        entries[element] = {dot}
                    else:
                        mine.add(dot)
                    index[dot] = element
        # 3. Only now: steps 1-2 need the contexts as they were before the join.
        c1.merge(c2)
        return self

    # -- reading -------------------------------------------------------------------

    def __contains__(self, element: object) -> bool:
        return isinstance(element, str) and element in self._entries

    def elements(self) -> frozenset[str]:
        return frozenset(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def dots(self, element: str) -> frozenset[Dot]:
        """Dots of the live adds of ``element`` (empty if absent)."""
        return frozenset(self._entries.get(element, ()))

    @property
    def context(self) -> CausalContext:
        """Every dot seen. Read-only: mutating it would break invariant 3."""
        return self._ctx

    def is_empty_delta(self) -> bool:
        """True for a delta that changes nothing (no entries, empty context)."""
        return not self._entries and self._ctx._is_empty()

    def copy(self) -> ORSet:
        new = ORSet.__new__(ORSet)
        new._entries = {element: set(dots) for element, dots in self._entries.items()}
        new._index = self._index.copy()
        new._ctx = self._ctx.copy()
        return new

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ORSet):
            return NotImplemented
        return self._entries == other._entries and self._ctx == other._ctx

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        entries = {e: _sorted_dots(self._entries[e]) for e in sorted(self._entries)}
        return f"ORSet(entries={entries!r}, context={self._ctx!r})"

    # -- wire form -----------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        """``{"e": {element: [[r, c], ...]}, "c": context}``, deterministic order."""
        entries = self._entries
        return {
            "e": {element: _sorted_dots(entries[element]) for element in sorted(entries)},
            "c": self._ctx.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: object) -> ORSet:
        """Inverse of ``to_dict``; ``ValueError`` on anything malformed."""
        d = _check_keys(d, "OR-set", {"e", "c"})
        ctx = CausalContext.from_dict(d["c"])
        raw = d["e"]
        if not isinstance(raw, dict):
            raise ValueError(f"OR-set entries must be a dict, got {type(raw).__name__}")
        entries: dict[str, set[Dot]] = {}
        owner: dict[Dot, str] = {}
        for element, raw_dots in raw.items():
            if not isinstance(element, str):
                raise ValueError(f"OR-set element must be a str, got {element!r}")
            if not isinstance(raw_dots, list) or not raw_dots:
                raise ValueError(f"OR-set element {element!r} needs a non-empty list of dots")
            dots: set[Dot] = set()
            for raw_dot in raw_dots:
                dot = _check_dot(raw_dot)
                if not ctx.contains(dot):
                    raise ValueError(f"dot {list(dot)} of {element!r} is not in the context")
                if owner.setdefault(dot, element) != element:
                    raise ValueError(f"dot {list(dot)} is listed under two elements")
                dots.add(dot)
            entries[element] = dots
        new = cls.__new__(cls)
        new._entries = entries
        new._index = owner
        new._ctx = ctx
        return new
