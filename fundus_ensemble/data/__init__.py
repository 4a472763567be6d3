"""Stage 1, data: manifests, label-table importers, splits, imaging, preprocessing, synthetic photos, batches, augmentation.

Imports only the package root (labels, errors, fileio); importing this package is cheap (no Keras)."""
