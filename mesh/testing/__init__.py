"""Test support shipped with storemesh (like ``trio.testing``): the ports' contract
suites (``mesh.testing.contracts``), which a third-party port can run to prove itself."""
