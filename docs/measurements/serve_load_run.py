# An untrained EfficientNet-Lite2 pair at 224 px: the production architecture's speed (weights do not change it).
import json
import sys
from pathlib import Path

import cv2

from fundus_ensemble.data.synthetic import EyeSpec, render_eye
from fundus_ensemble.labels import LABELS
from fundus_ensemble.models import build_patient_model

run = Path(sys.argv[1])
for view in ("color", "gray_eq"):
    (run / view).mkdir(parents=True, exist_ok=True)
    build_patient_model("efficientnet_lite2", 224, None, 0.5).save(str(run / view / "model.keras"))
    (run / view / "card.json").write_text(
        json.dumps({"view": view, "labels": list(LABELS), "input_size": 224, "backbone": "efficientnet_lite2"})
    )
for eye, seed in (("left", 1), ("right", 2)):
    cv2.imwrite(str(run.parent / f"{eye}.jpg"), render_eye(EyeSpec(frozenset({"D"}), eye, seed), 512))
