"""The client library: a sans-I/O core under blocking and trio adapters, buffers, imports."""
