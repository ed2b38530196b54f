"""Hybrid logical clock (Kulkarni, Demirbas et al., "Logical Physical Clocks", 2014).

A timestamp is one packed int, ``(wall_ms << 16) | counter``, so timestamps compare
as plain ints and the (wall, counter) lexicographic order of the paper is int order.
Wall time is passed in by the caller; this module never reads a clock.

Invariants:

1. Every timestamp satisfies ``0 <= ts <= MAX_TS`` (it fits a signed 64-bit integer,
   as SQLite INTEGER and orjson need), with ``0 <= counter <= 0xFFFF``.
2. ``last`` never decreases, whatever the wall clock does (it may jump backwards).
3. ``now`` and ``update`` return a timestamp strictly greater than every timestamp the
   clock returned or observed (``update``'s remote) before.
4. When the wall clock is ahead of everything seen, the result is ``(wall_ms, 0)``:
   the clock tracks physical time and the counter stays small.
5. Counter overflow carries into the wall part: the successor of ``(w, 0xFFFF)`` is
   ``(w + 1, 0)``. Because of the packing this is just ``ts + 1``, still monotonic.
6. ``update`` refused because of ``max_skew_ms`` raises ``ValueError`` and leaves the
   clock unchanged.
"""

from __future__ import annotations

from typing import Final

__all__ = ["COUNTER_BITS", "HLC", "MAX_COUNTER", "MAX_TS", "pack_hlc", "unpack_hlc"]

#: Low bits of a packed timestamp that hold the logical counter.
COUNTER_BITS: Final = 16
#: Largest counter value; one more carries into the wall part.
MAX_COUNTER: Final = (1 << COUNTER_BITS) - 1
#: Largest timestamp: fits a signed 64-bit int (SQLite INTEGER, orjson). Its wall part,
#: 2**47 ms, is about year 6429.
MAX_TS: Final = (1 << 63) - 1
_MAX_WALL: Final = MAX_TS >> COUNTER_BITS


def _check_ts(ts: object, what: str) -> int:
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise ValueError(f"{what} must be an int, got {type(ts).__name__}")
    if not 0 <= ts <= MAX_TS:
        raise ValueError(f"{what} must be in [0, 2**63 - 1], got {ts}")
    return ts


def _check_wall(wall_ms: object) -> int:
    if not isinstance(wall_ms, int) or isinstance(wall_ms, bool):
        raise ValueError(f"wall_ms must be an int, got {type(wall_ms).__name__}")
    if not 0 <= wall_ms <= _MAX_WALL:
        raise ValueError(f"wall_ms must be in [0, 2**47 - 1], got {wall_ms}")
    return wall_ms


def pack_hlc(wall_ms: int, counter: int) -> int:
    """Pack ``(wall_ms, counter)`` into one int timestamp."""
    _check_wall(wall_ms)
    if not isinstance(counter, int) or isinstance(counter, bool):
        raise ValueError(f"counter must be an int, got {type(counter).__name__}")
    if not 0 <= counter <= MAX_COUNTER:
        raise ValueError(f"counter must be in [0, {MAX_COUNTER}], got {counter}")
    return (wall_ms << COUNTER_BITS) | counter


def unpack_hlc(ts: int) -> tuple[int, int]:
    """Split a packed timestamp into ``(wall_ms, counter)``."""
    _check_ts(ts, "timestamp")
    return ts >> COUNTER_BITS, ts & MAX_COUNTER


class HLC:
    """One replica's hybrid logical clock. Time comes in as ``wall_ms`` arguments."""

    __slots__ = ("_last",)

    def __init__(self, last: int = 0) -> None:
        self._last = _check_ts(last, "last")

    @property
    def last(self) -> int:
        """Greatest timestamp returned or observed so far."""
        return self._last

    def now(self, wall_ms: int) -> int:
        """Timestamp for a local or send event at physical time ``wall_ms``."""
        physical = _check_wall(wall_ms) << COUNTER_BITS
        # Wall clock ahead: (wall, 0). Otherwise keep the wall part and bump the
        # counter; with the packing, +1 also carries an overflowing counter (inv. 5).
        ts = physical if physical > self._last else self._last + 1
        if ts > MAX_TS:
            raise ValueError("HLC exhausted: timestamp would exceed 2**63 - 1")
        self._last = ts
        return ts

    def update(self, remote: int, wall_ms: int, max_skew_ms: int | None = None) -> int:
        """Timestamp for receiving a message stamped ``remote`` at time ``wall_ms``.

        With ``max_skew_ms``, a remote whose wall part is more than ``max_skew_ms``
        ahead of ``wall_ms`` is refused with ``ValueError`` (the clock is unchanged),
        so one wild clock cannot drag every replica's HLC into the future.
        """
        _check_ts(remote, "remote timestamp")
        physical = _check_wall(wall_ms) << COUNTER_BITS
        if max_skew_ms is not None:
            if not isinstance(max_skew_ms, int) or isinstance(max_skew_ms, bool):
                raise ValueError("max_skew_ms must be an int or None")
            if max_skew_ms < 0:
                raise ValueError(f"max_skew_ms must be >= 0, got {max_skew_ms}")
            remote_wall = remote >> COUNTER_BITS
            if remote_wall > wall_ms + max_skew_ms:
                raise ValueError(
                    f"remote clock too far ahead: {remote_wall - wall_ms} ms > "
                    f"{max_skew_ms} ms allowed"
                )
        # max over (last, remote) then +1 is the paper's case analysis on packed ints:
        # equal walls take max(counter) + 1; otherwise the larger side's counter + 1.
        logical = self._last if self._last >= remote else remote
        ts = physical if physical > logical else logical + 1
        if ts > MAX_TS:
            raise ValueError("HLC exhausted: timestamp would exceed 2**63 - 1")
        self._last = ts
        return ts

    def __repr__(self) -> str:
        wall, counter = self._last >> COUNTER_BITS, self._last & MAX_COUNTER
        return f"HLC(wall_ms={wall}, counter={counter})"
