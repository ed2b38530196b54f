"""Port contract suites, run against the real and the simulated implementation."""
