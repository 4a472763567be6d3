"""fundus-ensemble: two-view EfficientNet screening of fundus photographs for the eight ODIR-2019 labels.

Importing the package is cheap: modules that need Keras import it themselves.
"""

__version__ = "0.1.0"

from .labels import LABEL_NAMES, LABELS, SPLITS, VIEWS  # noqa: E402

__all__ = ["LABELS", "LABEL_NAMES", "SPLITS", "VIEWS", "__version__"]
