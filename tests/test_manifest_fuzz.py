"""Whatever text a user saves as a manifest, the parser loads it or raises ManifestError."""

from conftest import HEADER
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fundus_ensemble.data.manifest import parse_manifest
from fundus_ensemble.errors import ManifestError

CELLS = st.one_of(
    st.sampled_from(
        [
            "0",
            "1",
            "2",
            "-1",
            "yes",
            "",
            "train",
            "val",
            "test",
            "a.jpg",
            "../x.jpg",
            "/abs.jpg",
            "p1",
            '"',
            "\r",
            "\n",
            ",",
        ]
    ),
    st.text(max_size=12),
)
ROWS = st.lists(st.lists(CELLS, min_size=0, max_size=15).map(",".join), max_size=6)


def check(text):
    try:
        parse_manifest(text, "fuzz.csv", image_root=".", check_files=False)
    except ManifestError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_random_text(text):
    check(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ROWS, st.sampled_from(["\n", "\r\n", "\r"]), st.booleans())
def test_random_rows_under_a_valid_header(rows, newline, bom):
    check(("\ufeff" if bom else "") + newline.join([HEADER, *rows]))
