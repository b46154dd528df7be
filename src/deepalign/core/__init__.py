"""Core objects: specs, permutations, architectures, checkpoints."""
