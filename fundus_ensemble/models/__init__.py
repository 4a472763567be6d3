"""Stage 2, models: backbones, the input preprocessor, the patient classifier, the per-eye
baseline model and the losses (imports Keras). Imports only the package root and ``data``."""

from .backbone import BACKBONES, build_backbone
from .eye_classifier import build_eye_model
from .patient_classifier import build_patient_model
from .preprocessor import BackbonePreprocess
from .views import ColorView, EqualizedGray, WeightedAverage

__all__ = [
    "BACKBONES",
    "BackbonePreprocess",
    "ColorView",
    "EqualizedGray",
    "WeightedAverage",
    "build_backbone",
    "build_eye_model",
    "build_patient_model",
]
