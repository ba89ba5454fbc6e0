"""The wire: every message's layout, declared once, and its encoding. No I/O."""
