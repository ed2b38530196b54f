"""``python -m mesh`` is the ``storemesh`` command."""

from mesh.cli import main

main()
