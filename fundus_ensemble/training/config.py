"""The training configuration, importable without Keras (so that ``--help`` starts at once)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FundusError

LOSSES = ("weighted_bce", "asymmetric")
OUTPUT_BIASES = ("zero", "prior")
SCHEDULES = ("plateau", "cosine")
HEAD_FITS = ("epochs", "cross_fit")


@dataclass
class TrainConfig:
    """Everything that decides a training run; the defaults are the paper's configuration."""

    backbone: str = "efficientnet_b3"
    size: int = 448
    weights: str | None = None  # "imagenet", None (from scratch) or a local weights file
    batch_size: int = 15
    epochs: int = 30
    fine_tune_epochs: int = 10
    learning_rate: float = 1e-3
    fine_tune_lr_factor: float = 0.1
    dropout: float = 0.5
    rotation: float = 30.0  # data.augment.DEFAULT_ROTATION (a test keeps them equal)
    pos_weight_power: float = 0.5  # models.losses.DEFAULT_POWER (a test keeps them equal)
    loss: str = "weighted_bce"  # or "asymmetric" (models.losses.AsymmetricLoss; pos_weight_power unused)
    output_bias: str = "zero"  # or "prior": the output starts at the training prevalence's log-odds
    schedule: str = "plateau"  # or "cosine": one cosine over both phases (fine_tune_lr_factor unused)
    warmup_epochs: int = 0  # linear warm-up before the cosine (schedule "cosine" only)
    eye_head_weight: float = 0.0  # > 0: an auxiliary per-eye head learns the keywords' eye labels (data.keywords)
    lr_factor: float = 0.2
    lr_patience: int = 4
    lr_min_delta: float = 0.001
    early_stopping_patience: int = 5
    bn_recalibration_patients: int = 128
    seed: int = 0
    cache_images: bool | None = None  # keep decoded views in memory; None: when they fit (data.batches.choose_cache)
    workers: int = 1  # threads making batches (data.batches); the run is the same for any number
    precision: str = "float32"  # training.hardware.PRECISIONS
    jit_compile: bool | None = None  # XLA under TensorFlow; None: on for a GPU (JAX always compiles)
    devices: int = 1  # data-parallel devices of this machine (training.hardware.data_parallel)
    # pretrained backbones (weights not None) only:
    frozen_features: bool = True  # phase 1 learns the head on features computed once (training.features)
    feature_store: str | None = (
        None  # where frozen features are kept (training.features.FeatureStore); None: beside the views
    )
    # "epochs": the head learns by epochs on train (checkpoint chosen on val), then fine-tuning; "cross_fit": logistic
    # heads cross-fitted on the frozen features of every train and val patient, bagged (training.heads), no fine-tuning
    head_fit: str = "epochs"
    folds: int = 5  # head_fit "cross_fit": folds over the train and val patients
    # head_fit "cross_fit": how the two eyes' features are fused before the heads (training.heads.FUSIONS); every
    # fusion folds exactly into the patient model's concat(max, mean) head (LinearHead.as_max_mean)
    head_fusion: str = "max_mean"
    # head_fit "cross_fit": shifted copies of each train and val photo the heads also learn from (made by
    # preprocess.py --acquisition-copies; data.acquisition), for photos from other cameras
    acquisition_copies: int = 0
    fine_tune_fraction: float = 1.0  # share of the backbone's weighted layers, from the top, that learn in phase 2
    freeze_batchnorm: bool = True  # phase 2 keeps the backbone's BatchNorm in inference mode, its statistics fixed

    def check(self) -> TrainConfig:
        for name in ("size", "batch_size"):
            if getattr(self, name) < 1:
                raise FundusError(f"{name} must be positive, got {getattr(self, name)}")
        if self.epochs < 1 or self.fine_tune_epochs < 0:
            raise FundusError(
                f"need epochs >= 1 and fine_tune_epochs >= 0, got {self.epochs} and {self.fine_tune_epochs}"
            )
        if self.workers < 1 or self.devices < 1:
            raise FundusError(f"workers and devices must be at least 1, got {self.workers} and {self.devices}")
        if self.precision not in ("float32", "mixed_float16", "mixed_bfloat16"):
            raise FundusError(f"unknown precision {self.precision!r}; choose float32, mixed_float16 or mixed_bfloat16")
        for name, allowed in (("loss", LOSSES), ("output_bias", OUTPUT_BIASES), ("schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise FundusError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.warmup_epochs < 0 or (self.warmup_epochs and self.schedule != "cosine"):
            raise FundusError(f"warmup_epochs ({self.warmup_epochs}) needs schedule 'cosine' and must not be negative")
        if self.warmup_epochs >= self.epochs + self.fine_tune_epochs and self.warmup_epochs:
            raise FundusError(f"warmup_epochs ({self.warmup_epochs}) leaves no epoch for the cosine")
        if self.eye_head_weight < 0:
            raise FundusError(f"eye_head_weight must not be negative, got {self.eye_head_weight}")
        if self.head_fit not in HEAD_FITS:
            raise FundusError(f"unknown head_fit {self.head_fit!r}; choose one of {', '.join(HEAD_FITS)}")
        if self.head_fit == "cross_fit":
            if self.weights is None:
                raise FundusError(
                    "cross-fitted heads learn on a frozen pretrained backbone's features: give --weights "
                    "imagenet (or a file), not from-scratch weights"
                )
            if self.fine_tune_epochs or self.eye_head_weight:
                raise FundusError(
                    "cross-fitted heads leave the backbone frozen: use --fine-tune-epochs 0 and no "
                    "--eye-head-weight with --head-fit cross-fit"
                )
            if self.folds < 2:
                raise FundusError(f"cross-fitting needs at least 2 folds, got {self.folds}")
        from .heads import FUSIONS

        if self.acquisition_copies < 0 or (self.acquisition_copies and self.head_fit != "cross_fit"):
            raise FundusError(
                f"acquisition_copies ({self.acquisition_copies}) must not be negative, and needs head_fit cross_fit"
            )
        if self.head_fusion not in FUSIONS:
            raise FundusError(f"unknown head_fusion {self.head_fusion!r}; choose one of {', '.join(FUSIONS)}")
        if not 0 < self.fine_tune_fraction <= 1:
            raise FundusError(f"fine_tune_fraction must lie in (0, 1], got {self.fine_tune_fraction}")
        if not 0 <= self.dropout < 1:
            raise FundusError(f"dropout must lie in [0, 1), got {self.dropout}")
        return self
