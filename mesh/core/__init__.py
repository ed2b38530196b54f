"""Sans-I/O core: CRDTs, operations, envelopes, identity, replica, sync state machine."""
