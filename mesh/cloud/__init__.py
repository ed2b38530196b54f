"""The cloud peer: many stores' nodes behind one server, analytics, dashboard, HQ login."""
