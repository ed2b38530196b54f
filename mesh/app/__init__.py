"""Entry points: the storemesh command line and the demo."""
