"""Real network ports: WebSocket transport, zeroconf discovery, TLS, enrolment."""
