"""Reading reference data: .npy and CSV rules from DESIGN.md, with file-naming errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detectors import ProfileError, load_reference


class TestLoadReference:
    def test_npy_higher_dims_flattened(self, tmp_path: Path) -> None:
        """A (n, 8, 8) array becomes (n, 64) with generated feature names."""
        np.save(tmp_path / "ref.npy", np.arange(2 * 64, dtype=np.float32).reshape(2, 8, 8))
        X, y, names = load_reference(tmp_path / "ref.npy")
        assert X.shape == (2, 64)
        assert X.dtype == np.float64
        assert y is None
        assert names[:2] == ("x0", "x1")

    def test_npy_one_dimensional_refused(self, tmp_path: Path) -> None:
        """A 1-D array is ambiguous (one row or one feature?) and refused."""
        np.save(tmp_path / "v.npy", np.arange(5.0))
        with pytest.raises(ProfileError, match=r"v\.npy: expected a 2-D array"):
            load_reference(tmp_path / "v.npy")

    def test_npy_object_array_refused_without_unpickling(self, tmp_path: Path) -> None:
        """An object array needs pickle; it is refused, never unpickled."""
        np.save(tmp_path / "o.npy", np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
        with pytest.raises(ProfileError, match="pickle"):
            load_reference(tmp_path / "o.npy")

    def test_csv_with_header_and_label_column(self, tmp_path: Path) -> None:
        """A header is detected; --label-column drops that column and returns it as labels."""
        (tmp_path / "r.csv").write_text("a,label,b\n1,0,2\n3,1,4.5\n")
        X, y, names = load_reference(tmp_path / "r.csv", label_column="label")
        np.testing.assert_array_equal(X, [[1, 2], [3, 4.5]])
        assert y is not None
        np.testing.assert_array_equal(y, [0, 1])
        assert names == ("a", "b")

    def test_csv_without_header(self, tmp_path: Path) -> None:
        """A purely numeric first line is data, not a header."""
        (tmp_path / "r.csv").write_text("1,2\n3,4\n")
        X, _, names = load_reference(tmp_path / "r.csv")
        assert X.shape == (2, 2)
        assert names == ("x0", "x1")

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("a,b\n1,x\n", r"line 2, column 2: 'x' is not a number"),
            ("a,b\n1,2\n3\n", "line 3 has 1 fields, expected 2"),
            ("a,b\n1,nan\n", "line 2, column 2: NaN or infinity"),
            ("", "empty CSV"),
        ],
    )
    def test_csv_errors_name_line_and_column(self, tmp_path: Path, text: str, message: str) -> None:
        """Bad CSV content is reported with the file, line and column."""
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(ProfileError, match=message):
            load_reference(tmp_path / "bad.csv")

    def test_label_column_needs_header(self, tmp_path: Path) -> None:
        """Without a header a label column cannot be named."""
        (tmp_path / "r.csv").write_text("1,2\n3,4\n")
        with pytest.raises(ProfileError, match="needs a header"):
            load_reference(tmp_path / "r.csv", label_column="y")

    def test_missing_file_and_unknown_format(self, tmp_path: Path) -> None:
        """A missing file and an unsupported suffix are clear errors."""
        with pytest.raises(ProfileError, match="not found"):
            load_reference(tmp_path / "nope.npy")
        (tmp_path / "r.parquet").write_bytes(b"x")
        with pytest.raises(ProfileError, match="unsupported reference format"):
            load_reference(tmp_path / "r.parquet")
