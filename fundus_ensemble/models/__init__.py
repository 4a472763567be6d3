"""Backbones, the input preprocessor and the patient-level classifier (imports Keras)."""

from .backbone import BACKBONES, build_backbone
from .patient_classifier import build_patient_model
from .preprocessor import BackbonePreprocess

__all__ = ["BACKBONES", "BackbonePreprocess", "build_backbone", "build_patient_model"]
