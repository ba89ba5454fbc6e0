"""primed's benchmark: primed beside the floor (the same work with no framework).

``python -m benchmarks.bench`` measures; ``scripts/bench`` runs it on the host
and in the VM and merges the results.
"""
