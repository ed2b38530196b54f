"""Real storage: the SQLite ledger, the data directory, key, trust and credential files."""
