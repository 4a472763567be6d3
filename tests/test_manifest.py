import re

import numpy as np
import pytest
from conftest import HEADER, write_images

from fundus_ensemble.data.manifest import load_manifest, manifest_to_csv, parse_manifest
from fundus_ensemble.errors import ManifestError

ROW = "p1,a.jpg,b.jpg,0,1,0,0,0,0,0,0,train"


def manifest_file(tmp_path, text, encoding="utf-8"):
    write_images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    path = tmp_path / "m.csv"
    path.write_bytes(text.encode(encoding))
    return path


def test_loads_valid_manifest(tmp_path):
    m = load_manifest(manifest_file(tmp_path, f"{HEADER}\n{ROW}\np2,c.jpg,,1,0,0,0,0,0,0,0,val\n"))
    assert m.patient_ids == ["p1", "p2"]
    assert m.patients[1].right_image is None
    np.testing.assert_array_equal(m.label_matrix(), [[0, 1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
    assert m.image_path("a.jpg") == tmp_path / "a.jpg"


def test_bom_and_crlf_are_accepted(tmp_path):
    m = load_manifest(manifest_file(tmp_path, "\ufeff" + f"{HEADER}\r\n{ROW}\r\n"))
    assert m.patient_ids == ["p1"]


def test_unknown_columns_are_ignored_and_noted(tmp_path):
    with pytest.warns(UserWarning, match="ignoring unknown column.*notes"):
        m = load_manifest(manifest_file(tmp_path, f"{HEADER},notes\n{ROW},hello\n"))
    assert m.ignored_columns == ("notes",)


def test_roundtrip_through_csv(tmp_path):
    m = load_manifest(manifest_file(tmp_path, f"{HEADER},age,left_keywords\n{ROW},61,drusen\n"))
    again = parse_manifest(manifest_to_csv(m.patients), image_root=tmp_path)
    assert again.patients == m.patients


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("", r"m\.csv: the file is empty"),
        (f"{HEADER}\n", r"m\.csv: has a header but no patient rows"),
        (
            HEADER.replace(",split", "") + "\n" + ROW.rsplit(",", 1)[0] + "\n",
            r"m\.csv, row 1: missing required column\(s\) 'split'",
        ),
        (
            f"{HEADER}\n{ROW.replace(',1,0,0,0,0,0,0,train', ',2,0,0,0,0,0,0,train')}\n",
            r"m\.csv, row 2, column 'D', value '2': labels must be 0 or 1",
        ),
        (f"{HEADER}\n{ROW.replace('a.jpg,b.jpg,0', 'a.jpg,b.jpg,-1')}\n", r"row 2, column 'N', value '-1'"),
        (f"{HEADER}\n{ROW.replace('a.jpg,b.jpg,0', 'a.jpg,b.jpg,yes')}\n", r"row 2, column 'N', value 'yes'"),
        (f"{HEADER}\n{ROW.replace('a.jpg,b.jpg,0', 'a.jpg,b.jpg,')}\n", r"row 2, column 'N', value ''"),
        (
            f"{HEADER}\n{ROW}\n{ROW}\n",
            r"row 3, column 'patient_id', value 'p1': duplicate patient id \(first seen in row 2\)",
        ),
        (
            f"{HEADER}\n{ROW.replace('a.jpg', '/etc/a.jpg')}\n",
            r"row 2, column 'left_image', value '/etc/a.jpg': .*not absolute",
        ),
        (
            f"{HEADER}\n{ROW.replace('a.jpg', '../a.jpg')}\n",
            r"row 2, column 'left_image', value '../a.jpg': image path escapes",
        ),
        (f"{HEADER}\n{ROW.replace('a.jpg', 'x/../../a.jpg')}\n", r"value 'x/../../a.jpg': image path escapes"),
        (
            f"{HEADER}\n{ROW.replace('a.jpg', 'missing.jpg')}\n",
            r"row 2, column 'left_image', value 'missing.jpg': image file not found",
        ),
        (f"{HEADER}\n{ROW.replace('train', 'training')}\n", r"row 2, column 'split', value 'training': unknown split"),
        (
            f"{HEADER}\n{ROW.replace('a.jpg,b.jpg', ',')}\n",
            r"row 2, column 'left_image'.*neither a left nor a right image",
        ),
        (f"{HEADER}\n{ROW},extra\n", r"row 2: has 13 fields but the header has 12"),
        (f"{HEADER}\n{ROW.replace('p1', '')}\n", r"row 2, column 'patient_id', value '': patient id is empty"),
    ],
)
def test_precise_errors(tmp_path, text, pattern):
    with pytest.raises(ManifestError, match=pattern):
        load_manifest(manifest_file(tmp_path, text))


def test_not_utf8(tmp_path):
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(manifest_file(tmp_path, f"{HEADER}\n{ROW}\n".replace("p1", "pé"), encoding="latin-1"))


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match=re.escape(str(tmp_path / "nope.csv"))):
        load_manifest(tmp_path / "nope.csv")


def test_select_split(tmp_path):
    m = load_manifest(manifest_file(tmp_path, f"{HEADER}\n{ROW}\n"))
    assert len(m.select("train")) == 1
    with pytest.raises(ManifestError, match="split 'val' has no patients"):
        m.select("val")
