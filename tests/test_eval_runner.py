"""`crossget eval` end to end on a tiny testbed: scores, resume, results files, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import run, tasks


def _run(model_dir: Path, data: Path, out: Path, budgets: str = "full,48,32") -> list[dict]:
    code = run.main(
        [
            "--model",
            str(model_dir),
            "--task",
            "testbed",
            "--data",
            str(data),
            "--budgets",
            budgets,
            "--methods",
            "crossget,tome",
            "--batch-size",
            "4",
            "--max-new-tokens",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return json.loads((out / "results.json").read_text())


def test_eval_scores_every_method_and_budget(model_dir: Path, testbed: Path, tmp_path: Path):
    rows = _run(model_dir, testbed, tmp_path)
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("full", "full"),
        ("crossget", "48"),
        ("crossget", "32"),
        ("tome", "48"),
        ("tome", "32"),
    ]
    assert [r["visual_tokens"] for r in rows] == [64, 48, 32, 48, 32]
    for row in rows:
        answers = tmp_path / "answers" / f"testbed-{row['method']}-{row['budget']}.rank0.jsonl"
        predictions = [json.loads(line) for line in answers.read_text().splitlines()]
        assert len(predictions) == 10
        # The score is recomputed from the written answers, not invented.
        items = tasks.load_task("testbed", testbed)
        by_id = {p["id"]: p["prediction"] for p in predictions}
        expected = tasks.score_task("testbed", items, [by_id[i.item_id] for i in items])
        assert row["metrics"] == expected
    assert rows[1]["flops"] < rows[0]["flops"]
    table = (tmp_path / "results.md").read_text()
    assert "| crossget | 32 | 32 |" in table


def test_eval_resumes_without_redoing_answers(model_dir: Path, testbed: Path, tmp_path: Path):
    _run(model_dir, testbed, tmp_path, budgets="32")
    answers = tmp_path / "answers" / "testbed-crossget-32.rank0.jsonl"
    lines = answers.read_text().splitlines()
    # Simulate a crash: keep 6 answers and half a line.
    answers.write_text("\n".join(lines[:6]) + '\n{"id": "trunc')
    _run(model_dir, testbed, tmp_path, budgets="32")
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 10  # the cut line is gone and only the 4 missing were generated again
    assert [r["id"] for r in rows[:6]] == [json.loads(line)["id"] for line in lines[:6]]


def test_eval_refuses_answers_made_with_other_settings(
    model_dir: Path, testbed: Path, tmp_path: Path
) -> None:
    _run(model_dir, testbed, tmp_path, budgets="32")
    settings = json.loads((tmp_path / "answers" / "testbed-crossget-32.settings.json").read_text())
    assert settings["llm_positions"] == "original" and settings["model"] == str(model_dir)
    argv = ["--model", str(model_dir), "--task", "testbed", "--data", str(testbed)]
    argv += ["--budgets", "32", "--methods", "crossget", "--max-new-tokens", "2"]
    argv += ["--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"other settings \(llm_positions: original -> compact\)"):
        run.main([*argv, "--llm-positions", "compact"])
    # answers with no record (made before the record existed) are refused too
    (tmp_path / "answers" / "testbed-crossget-32.settings.json").unlink()
    with pytest.raises(SystemExit, match="no record of their settings"):
        run.main(argv)


def test_eval_refuses_answers_from_other_weights_or_data_under_the_same_name(
    model_dir: Path, testbed: Path, tmp_path: Path
) -> None:
    """Retraining a model or regenerating data keeps the names; the old answers must not be
    resumed as if they were the new model's."""
    import shutil

    from eval.testbed.data import export, make_dataset_dict
    from eval.testbed.model import build_reference

    model_copy, data_copy = tmp_path / "model", tmp_path / "data"
    shutil.copytree(model_dir, model_copy)
    shutil.copytree(testbed, data_copy)
    _run(model_copy, data_copy, tmp_path / "out", budgets="32")
    build_reference(size="cpu-tiny", image_size=112, seed=1)[0].save_pretrained(model_copy)
    with pytest.raises(SystemExit, match=r"other settings \(model_files: [0-9a-f]{16} -> "):
        _run(model_copy, data_copy, tmp_path / "out", budgets="32")
    shutil.rmtree(model_copy)
    shutil.copytree(model_dir, model_copy)
    _run(model_copy, data_copy, tmp_path / "out", budgets="32")  # same bytes: resumes
    shutil.rmtree(data_copy)
    export(make_dataset_dict(train=2, validation=2, test=10, seed=6), data_copy)
    with pytest.raises(SystemExit, match=r"other settings \(data_files: [0-9a-f]{16} -> "):
        _run(model_copy, data_copy, tmp_path / "out", budgets="32")


def test_data_fingerprint_reads_only_the_split(tmp_path: Path) -> None:
    (tmp_path / "hf" / "test").mkdir(parents=True)
    (tmp_path / "hf" / "train").mkdir()
    (tmp_path / "hf" / "test" / "data.arrow").write_bytes(b"test rows")
    (tmp_path / "hf" / "train" / "data.arrow").write_bytes(b"train rows")
    (tmp_path / "test.parquet").write_bytes(b"x" * (run.FINGERPRINT_EDGE_BYTES * 3))
    before = run.data_files_fingerprint(tmp_path, "test")
    (tmp_path / "hf" / "train" / "data.arrow").write_bytes(b"more train rows")
    assert run.data_files_fingerprint(tmp_path, "test") == before
    # the last byte of a file larger than both read ends together is still read
    with (tmp_path / "test.parquet").open("r+b") as handle:
        handle.seek(run.FINGERPRINT_EDGE_BYTES * 3 - 1)
        handle.write(b"y")
    assert run.data_files_fingerprint(tmp_path, "test") != before
    assert run.data_files_fingerprint(tmp_path / "missing", "test") == "none"


def test_adapter_and_state_folders_are_fingerprinted(model_dir: Path, tmp_path: Path) -> None:
    """A recovery run redone into the same OUT keeps the --adapter and --crossget-state paths;
    their files, read by the same fingerprint as the model's, tell the runs apart."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"lora A")
    (adapter / "nested").mkdir()
    before = run.folder_fingerprint(adapter)
    assert before != "none" and run.folder_fingerprint(None) == "none"
    (adapter / "adapter_model.safetensors").write_bytes(b"lora B")
    assert run.folder_fingerprint(adapter) != before
    state = adapter / "adapter_model.safetensors"
    assert run.folder_fingerprint(state) == run.files_fingerprint([state], adapter)
    assert run.model_folder(str(model_dir)) == model_dir
    assert (run.model_folder("reference") / "config.json").is_file()
    assert run.folder_fingerprint(run.model_folder("llava-hf/not-here")) == "none"


def test_missing_llava_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "questions.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="images, annotations.jsonl are missing"):
        tasks.load_task("vqav2", tmp_path)


def test_llava_layout_is_scored_with_the_vqa_metric(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    question = {"question_id": 1, "image": "a.png", "text": "How many?"}
    (tmp_path / "questions.jsonl").write_text(json.dumps(question) + "\n")
    truth = {"question_id": 1, "answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number"}
    (tmp_path / "annotations.jsonl").write_text(json.dumps(truth) + "\n")
    items = tasks.load_task("vqav2", tmp_path)
    assert items[0].load_image().size == (8, 8)
    scores = tasks.score_task("vqav2", items, ["two"])
    assert scores["accuracy"] == pytest.approx(90.0)  # 3 of 10 match: official leave-one-out
    assert scores["accuracy/number"] == pytest.approx(90.0)


def test_unknown_task_and_method_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task 'vqa3'"):
        tasks.load_task("vqa3", tmp_path)
    with pytest.raises(ValueError, match="method must be one of .*'magic'"):
        run.method_config("magic", 32, "cross")


def test_fastv_layer_is_lowered_only_for_shallow_llms() -> None:
    assert run.method_config("fastv", 32, "cross").fastv_layer == 2
    assert run.method_config("fastv", 32, "cross", llm_layers=32).fastv_layer == 2
    assert run.method_config("fastv", 32, "cross", llm_layers=2).fastv_layer == 1
    assert run.method_config("crossget", 32, "query", llm_layers=2).guidance == "query"


def test_a_k_at_r_budget_adds_the_in_llm_stage_to_any_encoder_side_method() -> None:
    """``128@0.5``: 128 tokens from the encoder, half of them kept from LLM layer 2 on (lowered
    for shallow LLMs, as FastV's layer is); FastV itself and a second setting are refused."""
    for method in ("crossget", "tome", "divprune", "visionzip"):
        config = run.method_config(method, 128, "cross", llm_layers=32, llm_keep_ratio=0.5)
        assert (config.method, config.visual_tokens) == (method, 128)
        assert (config.llm_keep_ratio, config.fastv_layer) == (0.5, 2)
    shallow = run.method_config("tome", 128, "cross", llm_layers=2, llm_keep_ratio=0.25)
    assert shallow.fastv_layer == 1 and shallow.llm_keep_ratio == 0.25
    assert run.method_config("tome", 128, "cross", llm_layers=2).llm_keep_ratio is None
    with pytest.raises(ValueError, match="not fastv"):
        run.method_config("fastv", 128, "cross", llm_keep_ratio=0.5)
    with pytest.raises(ValueError, match="set twice"):
        run.method_config(
            "crossget", 128, "cross", None, "original", {"llm_keep_ratio": 0.5}, llm_keep_ratio=0.5
        )
    with pytest.raises(SystemExit, match="K@R"):
        run.main(["--model", "reference", "--data", ".", "--budgets", "full,128@half"])


def test_two_processes_split_the_work_and_score_once(
    model_dir: Path, testbed: Path, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29611",
        "-m",
        "eval.run",
        "--model",
        str(model_dir),
        "--task",
        "testbed",
        "--data",
        str(testbed),
        "--budgets",
        "32",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "2",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=300)
    shards = sorted((tmp_path / "answers").glob("testbed-crossget-32.rank*.jsonl"))
    assert [len(p.read_text().splitlines()) for p in shards] == [5, 5]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == 1 and rows[0]["items"] == 10


def test_mmbench_tsv_is_asked_circularly_and_scored(tmp_path: Path) -> None:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage"
    row = f"7\tWhich colour?\tnan\tred\tblue\tgreen\tnan\tB\tcolour\t{image}"
    (tmp_path / "mmbench_dev.tsv").write_text(header + "\n" + row + "\n")
    items = tasks.load_task("mmbench", tmp_path)
    assert [i.item_id for i in items] == ["7", "1000007", "2000007"]
    # Shift 1 rotates the options: A=blue, B=green, C=red, so the gold letter moves to A.
    assert items[1].truth["answer"] == "A" and "A. blue" in items[1].question
    right = [i.truth["answer"] for i in items]
    assert tasks.score_task("mmbench", items, right)["overall"] == pytest.approx(100.0)
    one_wrong = [*right[:2], "C" if right[2] != "C" else "A"]
    assert tasks.score_task("mmbench", items, one_wrong)["overall"] == pytest.approx(0.0)


def test_per_family_takes_the_first_items_of_every_family(testbed: Path) -> None:
    items = tasks.load_task("testbed", testbed)
    kept = tasks.load_task("testbed", testbed, per_group=1)
    families = list(dict.fromkeys(i.group for i in items))
    assert [i.group for i in kept] == families  # one each, in first-seen order
    assert [i.item_id for i in kept] == [
        next(i for i in items if i.group == family).item_id for family in families
    ]
    assert len(tasks.load_task("testbed", testbed, limit=2, per_group=1)) == 2
    with pytest.raises(ValueError, match="at least 1"):
        tasks.first_per_group(items, 0, lambda i: i.group)


def test_no_progress_hides_the_bars_and_changes_no_answer(
    model_dir: Path, testbed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Long runs log to files, where a redrawn bar is thousands of lines; the flag is not an
    answer setting, so a run resumed with it reuses the answers."""
    argv = ["--model", str(model_dir), "--task", "testbed", "--data", str(testbed)]
    argv += ["--budgets", "32", "--batch-size", "4", "--max-new-tokens", "2"]
    assert run.main([*argv, "--out", str(tmp_path / "bars")]) == 0
    assert "testbed-crossget-32 [0]" in capsys.readouterr().err
    assert run.main([*argv, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert "testbed-crossget-32 [0]" not in capsys.readouterr().err
    answers = "answers/testbed-crossget-32.rank0.jsonl"
    assert (tmp_path / "quiet" / answers).read_text() == (tmp_path / "bars" / answers).read_text()
    assert run.main([*argv, "--out", str(tmp_path / "quiet")]) == 0  # same settings: resumes
