"""The HTML report: self-contained, thresholds from the captured policy, ROC only with labels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guard_agent.tuning import read_capture
from guard_agent.tuning.report import ReportInputs, render_report
from tests.unit.test_replay import Recorder

pytest.importorskip("matplotlib")


def capture(tmp_path: Path) -> Path:
    r = Recorder(tmp_path / "cap.jsonl")
    for i in range(30):
        r.add(f"ok-{i}", 100.0 + i, {"ood.combined": i / 40, "session.risk": 0.01 * (i % 3)}, "allow",
              session=f"{i % 5:032d}")
    r.add("bad", 140.0, {"ood.combined": 0.99995, "session.risk": 0.9}, "block", "ood-block",
          ("ood-flag", "ood-block"), session="f" * 32)
    return r.write()


class TestReport:
    def test_without_labels(self, tmp_path: Path) -> None:
        """Timeline, sessions and score plots are embedded PNGs; no ROC without labels; no external references."""
        page = render_report(ReportInputs(capture=read_capture([capture(tmp_path)])))
        assert page.count("<img ") == 3 and "ROC" not in page
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "<script" not in page
        assert "ood-block" in page and "thresholds from &lt;captured policy" in page
        assert "f" * 16 in page  # the blocked session leads the session table

    def test_with_labels_adds_roc(self, tmp_path: Path) -> None:
        """Labelled attack sessions add ROC curves with an AUC table."""
        page = render_report(ReportInputs(capture=read_capture([capture(tmp_path)]),
                                          attack_sessions=frozenset({"f" * 32})))
        assert page.count("<img ") == 4 and "AUC" in page
