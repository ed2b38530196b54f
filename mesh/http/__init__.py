"""HTTP: the POS API, its door (credentials, roles), catalog/sensor routes, metrics."""
