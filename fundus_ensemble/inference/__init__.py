"""Stage 5, inference: trained pairs on new, unlabelled photos."""
