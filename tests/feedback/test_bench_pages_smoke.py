"""The page-speed benchmark runs end to end on a small project and prints its table (not a timing test)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_feedback_pages_benchmark_prints_figures(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "feedback_pages.py"), "--items", "50", "--labels", "100",
                           "--requests", "5", "--json", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "50 items, 100 labels" in done.stdout
    rows = {}
    for line in done.stdout.splitlines():
        found = re.match(r"(annotator task page|admin project page)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s", line)
        if found:
            rows[found.group(1)] = [float(x) for x in found.groups()[1:]]
    assert set(rows) == {"annotator task page", "admin project page"}, done.stdout
    for requests, median, p95, client in rows.values():
        assert requests == 5 and 0 < median <= p95 and client > 0
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert figures["items"] == 50 and figures["labels"] == 100 and len(figures["results"]) >= 2
