"""Stage 3, training: the view models' training loop, its callbacks, and the plain per-eye baseline."""
