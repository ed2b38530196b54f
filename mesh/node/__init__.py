"""A node: the one driver assembled over the real ports under asyncio."""
