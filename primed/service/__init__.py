"""The service around the daemon: configuration and logging."""
