"""Serving: load any run, encode users and items, score pairs and top-K."""
