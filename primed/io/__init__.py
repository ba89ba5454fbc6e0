"""Clients over real sockets: :mod:`primed.io.blocking` and :mod:`primed.io.trio`."""
