import pytest

from fundus_ensemble.data.importers import import_label_table
from fundus_ensemble.errors import ManifestError

IMAGE_TABLE = """filename,ID,eye,patient_age,patient_sex,eye_keywords,N,D,G,C,A,H,M,O
0_left.jpg,0,left,69,Female,cataract,0,0,0,1,0,0,0,0
0_right.jpg,0,right,69,Female,normal fundus,0,0,0,1,0,0,0,0
1_left.jpg,1,left,57,Male,normal fundus,1,0,0,0,0,0,0,0
2_right.jpg,2,right,40,Male,drusen,0,0,0,0,1,0,0,0
3_left.jpg,3,left,50,Male,normal fundus,1,0,0,0,0,0,0,0
"""

KAGGLE = """ID,Patient Age,Patient Sex,Left-Fundus,Right-Fundus,Left-Diagnostic Keywords,Right-Diagnostic Keywords,N,D,G,C,A,H,M,O,filepath,labels,target,filename
0,69,Female,0_left.jpg,0_right.jpg,cataract,normal fundus,0,0,0,1,0,0,0,0,x,['C'],"[0, 0, 0, 1, 0, 0, 0, 0]",0_right.jpg
1,57,Male,1_left.jpg,1_right.jpg,normal fundus,normal fundus,1,0,0,0,0,0,0,0,x,['N'],"[1, 0, 0, 0, 0, 0, 0, 0]",1_right.jpg
1,57,Male,1_left.jpg,1_right.jpg,normal fundus,normal fundus,1,0,0,0,0,0,0,0,x,['N'],"[1, 0, 0, 0, 0, 0, 0, 0]",1_left.jpg
"""


@pytest.fixture()
def root(tmp_path):
    for name in ("0_left.jpg", "0_right.jpg", "1_left.jpg", "1_right.jpg", "2_right.jpg"):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / name).write_bytes(b"x")
    return tmp_path


def test_image_table(root):
    (root / "labels.csv").write_text(IMAGE_TABLE)
    patients, report = import_label_table(root / "labels.csv", "image-table", root)
    by_id = {p.patient_id: p for p in patients}
    assert list(by_id) == ["0", "1", "2"]
    assert by_id["0"].left_image == "images/0_left.jpg" and by_id["0"].right_image == "images/0_right.jpg"
    assert by_id["0"].labels == (0, 0, 0, 1, 0, 0, 0, 0)
    assert by_id["0"].extra == {
        "left_keywords": "cataract",
        "right_keywords": "normal fundus",
        "age": "69",
        "sex": "Female",
    }
    assert by_id["1"].right_image is None and by_id["2"].left_image is None
    assert report.missing_images == ["images/3_left.jpg"] and report.dropped_patients == ["3"]


def test_kaggle_full_df(root):
    (root / "full_df.csv").write_text(KAGGLE)
    patients, report = import_label_table(root / "full_df.csv", "kaggle", root)
    assert [p.patient_id for p in patients] == ["0", "1"]
    assert patients[1].left_image == "images/1_left.jpg" and patients[1].right_image == "images/1_right.jpg"
    assert patients[0].extra["left_keywords"] == "cataract"
    assert not report.missing_images


def test_disagreeing_labels_of_one_patient(root):
    bad = IMAGE_TABLE.replace(
        "0_right.jpg,0,right,69,Female,normal fundus,0,0,0,1", "0_right.jpg,0,right,69,Female,normal fundus,0,1,0,1"
    )
    (root / "labels.csv").write_text(bad)
    with pytest.raises(
        ManifestError, match=r"labels.csv, row 3, column 'ID', value '0': labels .* disagree with row 2"
    ):
        import_label_table(root / "labels.csv", "image-table", root)


def test_bad_label_and_missing_column(root):
    (root / "labels.csv").write_text(IMAGE_TABLE.replace("57,Male,normal fundus,1", "57,Male,normal fundus,x"))
    with pytest.raises(ManifestError, match=r"row 4, column 'N', value 'x'"):
        import_label_table(root / "labels.csv", "image-table", root)
    (root / "labels.csv").write_text(IMAGE_TABLE.replace("eye,", "side,"))
    with pytest.raises(ManifestError, match="missing column.*'eye'"):
        import_label_table(root / "labels.csv", "image-table", root)
