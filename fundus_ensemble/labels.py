"""The eight ODIR-2019 labels, in the order of the official submission format."""

LABELS: tuple[str, ...] = ("N", "D", "G", "C", "A", "H", "M", "O")

LABEL_NAMES: dict[str, str] = {
    "N": "Normal",
    "D": "Diabetes",
    "G": "Glaucoma",
    "C": "Cataract",
    "A": "AMD",
    "H": "Hypertension",
    "M": "Myopia",
    "O": "Other",
}

VIEWS: tuple[str, ...] = ("color", "gray_eq")

SPLITS: tuple[str, ...] = ("train", "val", "test")

# The patient model's two inputs: one eye each (see models.patient_classifier).
INPUT_NAMES: tuple[str, str] = ("left_eye", "right_eye")
