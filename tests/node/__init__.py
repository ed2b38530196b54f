"""One node or cloud in this process: HTTP API, TLS, CLI, enrolment, discovery."""
