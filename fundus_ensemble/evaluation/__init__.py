"""Stage 4, evaluation: calibration, the two-view ensemble and its score, and the benchmark."""
