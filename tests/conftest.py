"""Settings for every tier."""

from __future__ import annotations

from hypothesis import settings

# Hypothesis fails an example that takes over 200 ms by default: a timing
# assertion in disguise, and on a shared 2-core machine it fails at random.
settings.register_profile("primed", deadline=None)
settings.load_profile("primed")
