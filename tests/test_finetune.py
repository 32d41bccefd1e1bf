"""Recovery fine-tuning (recipes/llava_finetune.py) on the tiny testbed LLaVA (64 visual tokens).

One 4-step run (budget 32, checkpoints at 2 and 4) is shared by most tests: what trains, what
is written, that a fresh base + the saved run reproduces the in-memory model, merging, resume
and `crossget eval --adapter`. Smaller runs cover query guidance and bad input; one
subprocess run covers DDP with two CPU processes through recipes/llava_finetune.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mllm_crossget as crossget
from eval.testbed.model import format_prompt
from eval.testbed.training.train import IGNORE_INDEX, collator_for, load_examples
from recipes import llava_finetune as ft

REPO = Path(__file__).resolve().parents[1]
BUDGET = 32
STEPS = 4
# Identical computations on a fresh model: only float summation order could differ.
RELOAD_ATOL = 1e-6
# LoRA folded into the weights (W + s*B@A) rounds differently from x@W + s*(x@A)@B.
MERGE_ATOL = 1e-5
# Resumed vs uninterrupted run: same data order, RNG and optimizer state.
RESUME_ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _argv(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--split",
        "test",  # the fixture's test split has 10 images; train has 2
        "--visual-tokens",
        str(BUDGET),
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--batch-size",
        "2",
        "--lr",
        "5e-3",
        "--logging-steps",
        "1",
        "--output-dir",
        str(out),
        "--no-progress",
        *extra,
    ]


def _train(argv: list[str]) -> ft.FinetuneRun:
    args = ft.build_parser().parse_args(argv)
    args.argv = argv
    return ft.train(args)


@pytest.fixture(scope="module")
def run(model_dir: Path, testbed: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("finetune") / "run"
    trained = _train(_argv(model_dir, testbed, out, "--max-steps", str(STEPS), "--save-steps", "2"))
    trained.model.eval()
    trained.out = out
    return trained


@pytest.fixture(scope="module")
def batch(run: Any, testbed: Path) -> dict[str, torch.Tensor]:
    """Two images, left-padded prompts of different lengths, through the adjusted processor."""
    examples = load_examples(testbed, "test")[:2]
    processor = run.processor
    processor.tokenizer.padding_side = "left"
    return processor(
        images=[e.load_image() for e in examples],
        text=[format_prompt(e.turns[0].question) for e in examples],
        return_tensors="pt",
        padding=True,
    )


@torch.no_grad()
def _logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


# --------------------------------------------------------------------------- what trains


def test_help_explains_every_flag() -> None:
    parser = ft.build_parser()
    undocumented = [a.dest for a in parser._actions if a.dest != "help" and not a.help]
    assert undocumented == []


def test_help_names_each_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        ft.main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    entries = text.split(" --")[1:]  # one per flag (usage line included, harmless)
    twice = [e[:60] for e in entries if e.count("(default") > 1]
    assert twice == []
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "images/) (default" not in text
    assert "(default: 16)" in text  # --lora-r still names its default


def test_bitsandbytes_kernels_notice_is_silenced(caplog: pytest.LogCaptureFixture) -> None:
    """bitsandbytes logs this on import on AVX512-BF16 CPUs without the `kernels` package;
    peft imports bitsandbytes on every fine-tune start, quantising or not."""
    import logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
            "you already `pip install kernels` and the kernels >= 0.11.1",
            ModuleNotFoundError("No module named 'kernels'"),
        )
        logger.warning("any other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["any other bitsandbytes warning"]


def test_shell_wrapper_help_and_a_python_without_the_project(tmp_path: Path) -> None:
    script = ["bash", str(REPO / "recipes" / "llava_finetune.sh")]
    env = {k: v for k, v in os.environ.items() if k not in ("DATA", "PYTHON")}
    shown = subprocess.run(
        [*script, "--help"],
        env={**env, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "error" not in shown.stderr
    assert "DATA " in shown.stdout and "BUDGET " in shown.stdout  # the wrapper's variables
    assert "--output-dir" in shown.stdout and "--overwrite" in shown.stdout  # the recipe's flags
    bare = tmp_path / "python-without-site-packages"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S -I "$@"\n')
    bare.chmod(0o755)
    failed = subprocess.run(
        script,
        env={**env, "PYTHON": str(bare), "DATA": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr and "ModuleNotFoundError" not in failed.stderr
    assert f"PYTHON={bare} cannot import torch" in failed.stderr
    assert "PYTHON=.venv/bin/python" in failed.stderr and "pip install -e ." in failed.stderr


def test_only_lora_and_cross_tokens_train(run: Any, model_dir: Path) -> None:
    trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in n or "crossget_tokens.modules_to_save" in n for n in trainable)
    assert not [n for n in trainable if "vision_tower" in n or "multi_modal_projector" in n]
    lora_in_tower = [
        n for n, m in run.model.named_modules() if "vision_tower" in n and hasattr(m, "lora_A")
    ]
    assert lora_in_tower == []
    assert run.summary["trainable_parameters"]["other"] == 0
    # The frozen weights are bit-identical to the base after training ...
    base = ft.load_base(model_dir)[0].state_dict()
    live = {
        k.replace(".base_layer", ""): v
        for k, v in run.model.get_base_model().state_dict().items()
        if "lora_" not in k and "crossget_tokens" not in k
    }
    shared = [k for k in base if k in live]
    assert any("vision_tower" in k for k in shared) and any("language_model" in k for k in shared)
    assert all(torch.equal(live[k], base[k]) for k in shared)
    # ... while the trainable ones moved (LoRA B and the prompts start at zero).
    tokens = crossget.cross_tokens(run.model.get_base_model())
    assert tokens.vision_prompts.abs().max() > 0 and tokens.text_prompts.abs().max() > 0
    lora_b = [p for n, p in run.model.named_parameters() if "lora_B" in n]
    assert all(p.abs().max() > 0 for p in lora_b)


def test_run_folder_has_logs_adapter_and_state(run: Any) -> None:
    history = json.loads((run.out / "loss.json").read_text())["history"]
    steps = [h for h in history if "loss" in h]
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1))
    assert all(h["alignment_js"] >= 0 for h in steps)
    assert (run.out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run.out / "train_summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == STEPS
    assert summary["visual_tokens"] == BUDGET and summary["alignment_loss"] is True
    adapter = load_file(str(run.out / "adapter" / "adapter_model.safetensors"))
    assert any("crossget_tokens" in k for k in adapter) and any("lora_A" in k for k in adapter)
    config = crossget.CrossGETConfig.from_pretrained(run.out / "crossget")
    assert config.visual_tokens == BUDGET


# --------------------------------------------------------------------------- reloading


def test_fresh_base_plus_run_gives_the_trained_logits(
    run: Any, model_dir: Path, batch: dict[str, torch.Tensor]
) -> None:
    reloaded, processor = ft.load_finetuned(str(model_dir), run.out)
    assert crossget.num_visual_tokens(reloaded.get_base_model()) == BUDGET
    expected = _logits(run.model, batch)
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=RELOAD_ATOL, rtol=0)
    # Training mattered: the untrained CrossGET model answers differently.
    untrained, _ = ft.load_base(model_dir)
    crossget.apply(untrained, crossget.CrossGETConfig(visual_tokens=BUDGET))
    assert (_logits(untrained.eval(), batch) - expected).abs().max() > 1e-3


def test_merge_and_unload_serves_the_same_logits(
    run: Any, model_dir: Path, batch: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    merged_dir = ft.merge_and_save(model_dir, run.out, tmp_path / "merged")
    weights = load_file(str(merged_dir / "model.safetensors"))
    assert not [k for k in weights if "lora" in k or "crossget" in k]  # a stock LLaVA
    model = LlavaForConditionalGeneration.from_pretrained(merged_dir, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(merged_dir)
    model, processor = crossget.from_pretrained(model.eval(), merged_dir / "crossget", processor)
    torch.testing.assert_close(
        _logits(model, batch), _logits(run.model, batch), atol=MERGE_ATOL, rtol=0
    )


def test_eval_cli_takes_the_adapter(run: Any, model_dir: Path, testbed: Path, tmp_path: Path):
    from eval import run as eval_run

    common = ["--model", str(model_dir), "--task", "testbed", "--data", str(testbed)]
    common += ["--budgets", str(BUDGET), "--limit", "2", "--max-new-tokens", "2"]
    code = eval_run.main(
        [
            *common,
            "--adapter",
            str(run.out / "adapter"),
            "--crossget-state",
            str(run.out / "crossget"),
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["budget"], r["visual_tokens"], r["items"]) for r in rows] == [(str(BUDGET), 32, 2)]
    with pytest.raises(SystemExit, match="--crossget-state"):
        eval_run.main([*common, "--adapter", str(run.out / "adapter"), "--out", str(tmp_path)])


# --------------------------------------------------------------------------- resume


def test_resume_matches_an_uninterrupted_run(
    run: Any, model_dir: Path, testbed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _argv(model_dir, testbed, tmp_path, "--max-steps", str(STEPS), "--save-steps", "2")
    first = _train([*argv, "--stop-after-steps", str(STEPS // 2)])  # "killed" after step 2
    assert first.summary["stopped_early"] and first.summary["steps"] == STEPS // 2
    capsys.readouterr()
    second = _train([*argv, "--resume"])
    assert f"resuming from checkpoint-{STEPS // 2} of run " in capsys.readouterr().out
    assert second.summary["resumed_from"].endswith(f"checkpoint-{STEPS // 2}")
    assert second.summary["steps"] == STEPS
    # train_loss is the mean over all STEPS steps, as in the uninterrupted run, not over the
    # resumed half only.
    assert second.summary["train_loss"] == pytest.approx(run.summary["train_loss"], abs=1e-5)
    assert second.summary["train_loss_this_session"] != pytest.approx(
        run.summary["train_loss"], abs=1e-5
    )
    resumed = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    straight = load_file(str(run.out / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=RESUME_ATOL, rtol=0)
    losses = [
        [h["loss"] for h in json.loads((d / "loss.json").read_text())["history"] if "loss" in h]
        for d in (tmp_path, run.out)
    ]
    assert len(losses[0]) == STEPS
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5, rtol=0)


def test_a_used_output_dir_is_refused_without_resume_or_overwrite(
    run: Any, model_dir: Path, testbed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = (run.out / "adapter" / "adapter_model.safetensors").read_bytes()
    code, err = _main(capsys, _argv(model_dir, testbed, run.out, "--max-steps", "2"))
    assert code == 2
    assert f"--output-dir {run.out} already holds a run" in err
    assert "adapter/" in err and "checkpoint-4/" in err
    assert "--resume" in err and "--overwrite" in err
    assert (run.out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert sorted(p.name for p in run.out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    parser = ft.build_parser()
    with pytest.raises(SystemExit):  # both at once makes no sense
        parser.parse_args(_argv(model_dir, testbed, run.out, "--resume", "--overwrite"))


def test_overwrite_then_resume_takes_only_the_runs_own_checkpoints(
    run: Any,
    model_dir: Path,
    testbed: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import Trainer

    out = tmp_path / "reused"
    shutil.copytree(run.out, out)  # a finished 4-step run with checkpoint-2 and -4
    (out / "notes.txt").write_text("mine")
    argv = _argv(model_dir, testbed, out, "--save-steps", "1")
    fresh = _train([*argv, "--max-steps", "1", "--overwrite"])
    assert fresh.summary["steps"] == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files went
    run_id = json.loads((out / "run_config.json").read_text())["run_id"]
    old_id = json.loads((run.out / "run_config.json").read_text())["run_id"]
    assert run_id != old_id
    assert json.loads((out / "checkpoint-1" / ft.RUN_MARKER).read_text())["run_id"] == run_id
    # Another run's checkpoint with a higher step, dropped into the folder: never resumed.
    shutil.copytree(run.out / "checkpoint-4", out / "checkpoint-300")
    step_one = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    # A run killed while writing its final adapter leaves the previous adapter/ whole.
    save_model = Trainer.save_model

    def dies_half_way(self: Any, output_dir: str | None = None, **kwargs: Any) -> None:
        if kwargs.get("_internal_call"):  # a checkpoint: saved as usual
            return save_model(self, output_dir, **kwargs)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_model", dies_half_way)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        _train([*argv, "--max-steps", "2", "--resume"])
    printed = capsys.readouterr().out
    assert "skipping checkpoint-300" in printed and "resuming from checkpoint-1 of run" in printed
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == step_one
    monkeypatch.undo()
    resumed = _train([*argv, "--max-steps", "3", "--resume"])
    assert resumed.summary["resumed_from"].endswith("checkpoint-2")
    assert resumed.summary["steps"] == 3
    assert not list(out.glob(".adapter.*")) and not list(out.glob(".crossget.*"))
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != step_one
    # Only the foreign checkpoint left: --resume refuses instead of restoring it.
    for checkpoint in out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    shutil.copytree(run.out / "checkpoint-4", out / "checkpoint-300")
    code, err = _main(capsys, [*argv, "--max-steps", "4", "--resume"])
    assert code == 2 and "checkpoint-300" in err and f"belongs to its run {run_id}" in err


def test_resume_of_a_finished_run_trains_no_further_step(
    model_dir: Path, testbed: Path, tmp_path: Path
) -> None:
    """A run killed after its last checkpoint (while writing the final adapter) resumes from
    a checkpoint at max_steps: it must load it and stop, not train a step more (transformers'
    loop, resumed there, would)."""
    argv = _argv(model_dir, testbed, tmp_path, "--max-steps", "2", "--save-steps", "1")
    first = _train(argv)
    adapter = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    history = (tmp_path / "loss.json").read_text()
    shutil.rmtree(tmp_path / "adapter")  # "killed" before the final adapter was written
    resumed = _train([*argv, "--resume"])
    assert first.summary["steps"] == resumed.summary["steps"] == 2
    assert resumed.summary["resumed_from"].endswith("checkpoint-2")
    assert resumed.summary["train_loss"] == pytest.approx(first.summary["train_loss"])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (tmp_path / "loss.json").read_text() == history


# --------------------------------------------------------------------------- query guidance


def test_query_guidance_never_pools_the_answer(
    model_dir: Path, testbed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = _train(_argv(model_dir, testbed, tmp_path, "--max-steps", "2", "--guidance", "query"))
    model = trained.model.eval()
    tokens = crossget.cross_tokens(model.get_base_model())
    assert tokens.query_map is not None and tokens.query_map[1].weight.requires_grad
    assert tokens.query_map[1].weight.abs().max() > 0  # zero-initialised, so it trained
    dataset = trained.trainer.train_dataset
    batch = ft.QueryMaskCollator(collator_for(trained.processor))([dataset[0], dataset[1]])
    answers = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["crossget_query_mask"], ~answers & batch["attention_mask"].bool())
    pooled: list[torch.Tensor] = []
    query_offset = tokens.query_offset

    def recording(text: torch.Tensor) -> torch.Tensor:
        pooled.append(text.detach().clone())
        return query_offset(text)

    monkeypatch.setattr(tokens, "query_offset", recording)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    changed = dict(inputs, input_ids=inputs["input_ids"].masked_fill(answers, 7))
    before = answers.int().argmax(dim=1)  # first answer position of each row
    first, second = _logits(model, inputs), _logits(model, changed)
    for row in range(2):  # what the model saw before the answer is untouched by the answer
        torch.testing.assert_close(
            first[row, : before[row]], second[row, : before[row]], atol=1e-6, rtol=0
        )
    assert torch.equal(pooled[0], pooled[1])
    # The check can fail: without the mask the pooled prompt does include the answer.
    inputs.pop("crossget_query_mask")
    changed.pop("crossget_query_mask")
    _logits(model, inputs), _logits(model, changed)
    assert (pooled[2] - pooled[3]).abs().max() > 1e-3


# --------------------------------------------------------------------------- bad input


def _llava_json(tmp_path: Path, testbed: Path, rows: list[Any], jsonl: bool = False) -> Path:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for source in sorted((testbed / "llava" / "images").glob("*.png"))[:2]:
        shutil.copy(source, images / source.name)
    path = tmp_path / ("data.jsonl" if jsonl else "data.json")
    if jsonl:
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def _row(image: str, question: str = "what color is the circle?", answer: str = "red") -> dict:
    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return {"id": image, "image": image, "conversations": turns}


def _first_images(testbed: Path) -> list[str]:
    return [p.name for p in sorted((testbed / "llava" / "images").glob("*.png"))[:2]]


def _main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = ft.main(argv)
    return code, capsys.readouterr().err


def test_missing_image_names_file_and_row(
    model_dir: Path, testbed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, _ = _first_images(testbed)
    data = _llava_json(tmp_path, testbed, [_row(good), _row("nope.png")])
    argv = _argv(model_dir, data, tmp_path / "out", "--image-folder", str(tmp_path / "images"))
    code, err = _main(capsys, argv)
    assert code == 2
    assert "row 1 (id=nope.png)" in err and str(tmp_path / "images" / "nope.png") in err
    with pytest.warns(UserWarning, match="row 1 .*nope.png"):
        examples = load_examples(data, "train", tmp_path / "images", on_bad_row="skip")
    assert [e.key for e in examples] == [good]


def test_malformed_rows_fail_or_are_skipped(
    model_dir: Path, testbed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = _first_images(testbed)
    rows = [_row(first), '{"id": "broken", "image": ', {"id": "x", "image": second}, _row(second)]
    data = _llava_json(tmp_path, testbed, rows, jsonl=True)
    argv = _argv(model_dir, data, tmp_path / "out", "--max-steps", "1")
    code, err = _main(capsys, argv)
    assert code == 2 and "line 2: not valid JSON" in err and "--on-bad-row skip" in err
    with pytest.warns(UserWarning) as caught:
        code, err = _main(capsys, [*argv, "--on-bad-row", "skip"])
    assert code == 0, err
    messages = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert len(messages) == 2
    assert "line 2" in messages[0] and "line 3 (id=x)" in messages[1]
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["images"] == 2


@pytest.mark.parametrize(("budget", "message"), [("500", "outside [1, 64]"), ("10", "impossible")])
def test_budget_the_model_cannot_reach(
    model_dir: Path,
    testbed: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    budget: str,
    message: str,
) -> None:
    argv = _argv(model_dir, testbed, tmp_path, "--visual-tokens", budget)
    code, err = _main(capsys, argv)
    assert code == 2 and "does not fit" in err and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_qlora_without_cuda_is_refused(
    model_dir: Path, testbed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _main(capsys, _argv(model_dir, testbed, tmp_path, "--qlora"))
    assert code == 2 and "--qlora needs a CUDA GPU" in err and "drop --qlora" in err


def test_zero3_is_refused_before_loading(
    model_dir: Path,
    testbed: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    code, err = _main(capsys, _argv(model_dir, testbed, tmp_path))
    assert code == 2 and "ZeRO-3" in err and "multi_gpu_ddp.yaml" in err


# --------------------------------------------------------------------------- launch configs


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("single_gpu", "NO"),
        ("multi_gpu_ddp", "MULTI_GPU"),
        ("fsdp", "FSDP"),
        ("deepspeed_zero3", "DEEPSPEED"),
    ],
)
def test_accelerate_configs_load(name: str, kind: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "recipes" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind


@pytest.mark.slow
def test_two_cpu_processes_through_the_shell_wrapper(
    model_dir: Path, testbed: Path, tmp_path: Path
) -> None:
    """accelerate + multi_gpu_ddp.yaml spawns two CPU workers; the Trainer joins them (gloo)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        BASE_MODEL=str(model_dir),
        DATA=str(testbed),
        BUDGET=str(BUDGET),
        NUM_PROCESSES="2",
        OUTPUT_DIR=str(tmp_path / "ddp"),
        MAIN_PROCESS_PORT=str(port),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    extra = ["--split", "test", "--max-steps", "2", "--batch-size", "2", "--lora-r", "4"]
    done = subprocess.run(
        ["bash", str(REPO / "recipes" / "llava_finetune.sh"), *extra, "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 0/2]" in done.stdout and "[rank 1/2]" in done.stdout
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()
