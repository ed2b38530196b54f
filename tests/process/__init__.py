"""Real processes: kill -9, restarts, many nodes, browsers."""
