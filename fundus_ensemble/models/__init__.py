"""Stage 2, models: backbones, the input preprocessor, the patient classifier, the per-eye
baseline model and the losses (imports Keras). Imports only the package root and ``data``.

The names below are imported on first use, so that :mod:`.registry` (what may be named, as data)
is read without starting Keras."""

from importlib import import_module

_WHERE = {
    "BACKBONES": ".registry",
    "BackbonePreprocess": ".preprocessor",
    "ColorView": ".views",
    "EqualizedGray": ".views",
    "WeightedAverage": ".views",
    "build_backbone": ".backbone",
    "build_eye_model": ".eye_classifier",
    "build_patient_model": ".patient_classifier",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value
