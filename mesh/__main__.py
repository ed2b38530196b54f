"""``python -m mesh`` is the ``storemesh`` command."""

from __future__ import annotations

import signal
import sys


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run() -> None:
    """The ``storemesh`` entry point. SIGTERM acts as Ctrl-C from here until a command's
    event loop takes the signals over (``mesh.app.cli._serve``): a stop while the command
    is still loading (over a second on a busy till) exits 0, where the default action
    would kill it (status 143). Nothing is open yet at that point."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from mesh.app.cli import main
    except KeyboardInterrupt:
        print("storemesh: interrupted while loading; nothing to stop", file=sys.stderr)
        sys.exit(0)
    main()


if __name__ == "__main__":
    run()
