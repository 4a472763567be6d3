"""The eight ODIR-2019 labels, in the order of the official submission format."""

from .errors import FundusError

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


def parse_classes(value: str | None, option: str = "class list") -> list[str] | None:
    """A comma-separated class list (``D,G``, ``all``) to names; empty or ``positive`` gives None."""
    if value is None or value.strip().lower() in ("", "positive", "decided"):
        return None
    names = [v.strip().upper() for v in value.split(",") if v.strip()]
    if names == ["ALL"]:
        return list(LABELS)
    unknown = [n for n in names if n not in LABELS]
    if unknown:
        raise FundusError(
            f"{option} {value!r}: unknown class(es) {', '.join(unknown)}; choose from {','.join(LABELS)} or all"
        )
    return list(dict.fromkeys(names))
