"""`python -m eval.recovery_study --report-only`: the table and the paired comparisons are
rebuilt from a finished run's saved answers, scored against the split's gold answers."""

from __future__ import annotations

import json
from pathlib import Path

from eval.recovery_study import main
from eval.testbed.data import load_split


def _row(setting: str, budget: str, slug: str, accuracy: float) -> dict:
    metrics = {"accuracy": accuracy, "accuracy/attribute": accuracy}
    return {"setting": setting, "budget": budget, "visual_tokens": 256 if budget == "full" else 64,
            "guidance": "cross", "slug": slug, "train_seconds": None, "metrics": metrics}  # fmt: skip


def test_report_only_pairs_settings_question_by_question(
    tmp_path: Path, testbed: Path, model_dir: Path, capsys
) -> None:
    gold = load_split(testbed, "test").remove_columns(["image"])
    ids, answers = list(gold["id"]), list(gold["answer"])
    assert len(ids) == 10
    # full: all right; training-free: last 4 wrong; LoRA: last 1 wrong and 1 of the first wrong.
    wrong = {"full": set(), "free": set(range(6, 10)), "ft": {0, 9}}
    out = tmp_path / "study"
    for slug, misses in wrong.items():
        folder = out / "eval" / slug / "answers"
        folder.mkdir(parents=True)
        lines = [
            json.dumps({"id": i, "prediction": "zzz" if k in misses else a})
            for k, (i, a) in enumerate(zip(ids, answers, strict=True))
        ]
        (folder / "testbed-crossget.rank0.jsonl").write_text("\n".join(lines) + "\n")
    rows = [
        _row("full model", "full", "full", 100.0),
        _row("training-free", "64", "free", 60.0),
        _row("LoRA + alignment", "64", "ft", 80.0),
    ]
    (out / "results.json").write_text(json.dumps({"args": {}, "rows": rows}))
    argv = ["--model", str(model_dir), "--data", str(testbed), "--out", str(out)]
    assert main([*argv, "--report-only"]) == 0
    text = (out / "results.md").read_text()
    assert "McNemar" in capsys.readouterr().out
    assert "| training-free vs full model | 64 | 0 | 4 | -40.0 | 0.125 |" in text
    # LoRA right alone on 6, 7, 8; training-free right alone on 0: 3 vs 1 of 4 -> p = 0.625.
    assert "| LoRA + alignment vs training-free | 64 | 3 | 1 | +20.0 | 0.625 |" in text
    # Against the full model's single row: right only in LoRA on none, only in full on 0 and 9.
    assert "| LoRA + alignment vs full model | 64 | 0 | 2 | -20.0 | 0.500 |" in text


def test_every_fine_tune_sees_one_question_per_sequence(tmp_path: Path, monkeypatch) -> None:
    """`query` guidance cannot pack turns; `cross` must not either, or the ablation compares
    data layouts instead of guidance."""
    import recipes.llava_finetune
    from eval.recovery_study import _finetune, build_parser, settings_for

    seen: list[list[str]] = []
    monkeypatch.setattr(recipes.llava_finetune, "main", lambda argv: seen.append(argv) or 0)
    args = build_parser().parse_args(["--out", str(tmp_path), "--no-progress"])
    trained = [s for s in settings_for([128, 64], 64, unreduced=256) if s.train]
    for setting in trained:
        _finetune(setting, args, tmp_path / setting.name)
    assert len(seen) == len(trained) == 5
    assert all("--no-pack" in argv for argv in seen)
    assert all("--overwrite" in argv for argv in seen)  # a rerun retrains, as before
    assert {argv[argv.index("--guidance") + 1] for argv in seen} == {"cross", "query"}


def test_control_fine_tunes_all_visual_tokens_without_alignment(model_dir: Path) -> None:
    from eval.recovery_study import CONTROL, settings_for, unreduced_visual_tokens

    config = json.loads((model_dir / "config.json").read_text())
    vision = config["vision_config"]
    unreduced = unreduced_visual_tokens(model_dir)
    assert unreduced == (vision["image_size"] // vision["patch_size"]) ** 2
    control = settings_for([64], 64, unreduced)[-1]
    assert (control.name, control.budget, control.train) == (CONTROL, str(unreduced), True)
    assert control.alignment_weight == 0.0
    assert all(s.name != CONTROL for s in settings_for([64], 64))


def test_no_progress_reaches_the_evaluations(tmp_path: Path, monkeypatch) -> None:
    """The study's --no-progress hides the evaluation bars too (they flooded its logs)."""
    import eval.run
    from eval.recovery_study import Setting, _evaluate, build_parser

    seen: list[list[str]] = []

    def fake_eval(argv: list[str]) -> int:
        seen.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps([{"budget": "64"}]))
        return 0

    monkeypatch.setattr(eval.run, "main", fake_eval)
    setting = Setting("training-free", "64", train=False)
    for flags, expected in (([], False), (["--no-progress"], True)):
        args = build_parser().parse_args(["--out", str(tmp_path), *flags])
        assert _evaluate(setting, args, None, tmp_path / "eval") == {"budget": "64"}
        assert ("--no-progress" in seen[-1]) is expected
