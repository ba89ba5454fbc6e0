"""The daemon: its sans-I/O core (sessions, buffers, tokens, quotas, handlers) and the
transport and process around it (accept loop, flow control, signals, sd_notify)."""
