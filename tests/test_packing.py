"""Isolated packed turns: a question packed with the image's other questions gets exactly the
logits (and grounding-loss rows) it gets alone, the single-question prompt of evaluation."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from eval.testbed import data
from eval.testbed.model import build_reference
from eval.testbed.training.grounding import (
    SIDE_KEYS,
    SUPERVISIONS,
    TURN_IDS_KEY,
    GroundingLoss,
    turn_visibility,
)


def test_turn_visibility() -> None:
    turn_ids = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    seen = turn_visibility(turn_ids)[0].int().tolist()
    assert seen == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # turn 2 skips turn 1
        [1, 1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],  # padding sees only itself (no empty softmax row)
    ]


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory):
    from eval.testbed.training.train import grounded_dataset, load_examples

    out = data.export(
        data.make_dataset_dict(train=12, validation=0, test=0, seed=5, train_questions_per_image=3),
        tmp_path_factory.mktemp("packing") / "data",
    )
    model, processor = build_reference(size="cpu-small", image_size=224, seed=0)
    model.eval()
    examples = load_examples(out, "train")
    dataset = grounded_dataset(examples, processor, model.config.image_seq_length)
    return model, processor, dataset, examples


def _alone(dataset, index: int) -> list[dict[str, torch.Tensor]]:
    """The item's turns, each as its own one-turn item, in the item's order."""
    item = dataset[index]
    turn_ids = item[TURN_IDS_KEY]
    singles = []
    for number in range(1, int(turn_ids.max()) + 1):
        keep = (turn_ids == 0) | (turn_ids == number)
        singles.append({"input_ids": item["input_ids"][keep], "keep": keep})
    return item, singles


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_turn_logits_equal_the_turn_alone(packed, implementation: str) -> None:
    from eval.testbed.training.train import collator_for, isolated_turns_mask

    model, processor, dataset, _ = packed
    model.config._attn_implementation = implementation
    model.model.language_model.config._attn_implementation = implementation
    item, singles = _alone(dataset, 0)
    assert len(singles) == 3
    batch = collator_for(processor)([item])
    turn_ids = batch.pop(TURN_IDS_KEY)
    positions = batch["position_ids"][0]
    prefix = int((turn_ids[0] == 0).sum())
    for single in singles:  # every turn restarts right after the image
        assert positions[single["keep"]].tolist() == list(range(len(single["input_ids"])))
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=isolated_turns_mask(turn_ids, model),
            position_ids=batch["position_ids"],
        ).logits[0]
        for single in singles:
            alone = model(
                input_ids=single["input_ids"][None], pixel_values=batch["pixel_values"]
            ).logits[0]
            own = single["keep"].nonzero().flatten()[prefix:]
            assert torch.allclose(logits[own], alone[prefix:], atol=1e-4)
    # Without isolation the later turns see the earlier ones: the logits differ.
    with torch.no_grad():
        shared = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits[0]
    last = singles[-1]["keep"].nonzero().flatten()[prefix:]
    assert not torch.allclose(shared[last], logits[last], atol=1e-4)
    model.config._attn_implementation = "sdpa"
    model.model.language_model.config._attn_implementation = "sdpa"


def test_grounding_loss_rows_of_packed_turns_equal_the_turn_alone(packed) -> None:
    from eval.testbed.training.train import collator_for, isolated_turns_mask

    model, processor, dataset, _ = packed
    supervision = SUPERVISIONS["readout"]
    term = GroundingLoss.for_supervision(model, supervision, 1.0, supervision.layer)
    collate = collator_for(processor)
    index = next(i for i in range(len(dataset)) if len(dataset[i][supervision.positions_key]) > 1)
    item = dataset[index]
    batch = collate([item])
    side = {key: batch.pop(key) for key in SIDE_KEYS}
    batch["attention_mask"] = isolated_turns_mask(side[TURN_IDS_KEY], model)
    with torch.no_grad():
        out = model(**batch)
        packed_loss = term(model, {**batch, **side}, out)
    # The same rows, one turn at a time without any packing.
    alone = copy.copy(dataset)
    image_index, turns = dataset.items[index]
    totals, rows = 0.0, 0
    for turn in turns:
        alone.items = [(image_index, [turn])]
        single = collate([alone[0]])
        single_side = {key: single.pop(key) for key in SIDE_KEYS}
        n = int((single_side[supervision.positions_key] >= 0).sum())
        if n == 0:
            continue
        with torch.no_grad():
            single_out = model(**single)
            totals += float(term(model, {**single, **single_side}, single_out)) * n
        rows += n
    term.remove()
    assert rows > 1
    assert abs(float(packed_loss) - totals / rows) < 1e-4


def test_train_cli_shares_turns_on_request(tmp_path: Path) -> None:
    from eval.testbed.training.train import build_parser

    args = build_parser().parse_args(["--data", "x", "--output-dir", str(tmp_path)])
    assert not args.share_turns
    args = build_parser().parse_args(["--data", "x", "--output-dir", "y", "--share-turns"])
    assert args.share_turns


def test_attention_report_scores_every_supervised_row(packed) -> None:
    from eval.testbed.attention_report import attention_report, format_report

    model, processor, dataset, examples = packed
    report = attention_report(model, processor, examples, {"evidence": 1}, progress=False)
    counts = {name: 0 for name in SUPERVISIONS}
    floor = []
    for index in range(len(dataset)):
        item = dataset[index]
        for name, supervision in SUPERVISIONS.items():
            counts[name] += len(item[supervision.positions_key])
        floor += torch.log1p(item[SUPERVISIONS["count"].masks_key].sum(-1).float()).tolist()
    for name, row in report.items():
        assert row["rows"] == counts[name], name
        if counts[name]:
            assert row["loss"] >= row["floor"] >= 0, name
    assert report["evidence"]["layer"] == 1 and report["readout"]["layer"] == 1  # 2 layers
    assert report["count"]["floor"] == pytest.approx(sum(floor) / len(floor), abs=1e-5)
    assert all(f"| {name} |" in format_report(report) for name in report)
    assert not model.training and not any(
        layer.self_attn._forward_pre_hooks for layer in model.model.language_model.layers
    )


def test_attention_report_count_shares_and_sink_weight(packed) -> None:
    from collections import Counter

    from eval.testbed.attention_report import (
        CountAttention,
        attention_report,
        format_count_shares,
    )

    model, processor, dataset, examples = packed
    shares: dict[int, CountAttention] = {}
    report = attention_report(
        model,
        processor,
        examples,
        {"evidence": 1, "count": 1},
        progress=False,
        supervision_overrides={"count": {"sink_weight": 4.0}},
        count_shares=shares,
    )
    things = Counter()
    entropies = []
    for index in range(len(dataset)):
        for n in dataset[index][SUPERVISIONS["count"].masks_key].sum(-1).tolist():
            things[n] += 1
            # the target (4, 1, ..., 1) / (n + 4), by hand
            target = torch.tensor([4.0] + [1.0] * n) / (n + 4)
            entropies.append(float(-(target * target.log()).sum()))
    assert things, "the fixture has no counting question"
    assert {n: tally.rows for n, tally in shares.items()} == dict(things)
    for tally in shares.values():
        assert 0 < tally.bos / tally.rows < 1
        parts = tally.bos + tally.things + tally.beside + tally.elsewhere
        assert parts == pytest.approx(tally.rows, abs=1e-4)
        assert min(tally.things, tally.beside, tally.elsewhere) >= -1e-6
    assert report["count"]["floor"] == pytest.approx(sum(entropies) / len(entropies), abs=1e-5)
    table = format_count_shares(shares, 4.0)
    assert len(table.splitlines()) == 2 + len(things)
    assert f"| {min(things)} |" in table and f"{4 / (min(things) + 4):.3f} |" in table


def test_count_attention_splits_one_row_by_hand() -> None:
    """A 4 x 4 grid, things at (1, 1) and (3, 3): the 8 patches around (1, 1) and the 3 around
    the corner (3, 3) are "beside", (2, 2) once though it touches both; the other 4 patches
    and the text are "elsewhere"."""
    from eval.testbed.attention_report import CountAttention, format_count_shares

    things = torch.zeros(16, dtype=torch.bool)
    things[[5, 15]] = True
    on_patches = torch.full((16,), 0.01)
    on_patches[5], on_patches[15] = 0.3, 0.1
    tally = CountAttention()
    tally.add(0.4, on_patches, things)
    assert tally.rows == 1 and tally.bos == pytest.approx(0.4)
    assert tally.things == pytest.approx(0.4)
    assert tally.beside == pytest.approx(10 * 0.01)
    assert tally.elsewhere == pytest.approx(1 - 0.4 - 0.4 - 0.1)  # 4 patches + 0.06 of text
    assert tally.spread == pytest.approx(torch.tensor([0.3, 0.1]).std().item() / 0.2)
    tally.add(0.5, torch.full((16,), 0.5 / 16), torch.zeros(16, dtype=torch.bool))
    assert tally.spread_rows == 1 and tally.things == pytest.approx(0.4)
    table = format_count_shares({2: tally})
    assert "| 2 | 2 | 0.450 | 0.333 | 0.200 | 0.050 | 0.300 | 0.71 |" in table
    with pytest.raises(ValueError, match="square grid"):
        tally.add(0.1, torch.zeros(15), torch.zeros(15, dtype=torch.bool))


def test_tally_readings_by_hand_and_from_the_report(packed) -> None:
    """Two rows of a 16-patch image: the head's channels hold its histogram (row 0: two of
    class 3, one of class 29; row 1: one of class 0), read as counts, class 29 0.6 off."""
    from eval.testbed.attention_report import (
        TallyReading,
        _add_tally_readings,
        attention_report,
        format_tally_readings,
    )
    from eval.testbed.patch_labels import TALLY_CLASSES
    from eval.testbed.training.grounding import TALLY_KEY, TALLY_VALUE

    classes = torch.full((2, 16), -1)
    classes[0, [1, 6, 9]] = torch.tensor([3, 3, 29])
    classes[1, 15] = 0
    head, head_dim, per_thing = 1, 32, TALLY_VALUE / 16
    outputs = torch.randn(2, 2 * head_dim)  # the other head's channels are never read
    counts = torch.zeros(2, len(TALLY_CLASSES))
    counts[0, 3], counts[0, 29], counts[1, 0] = 2, 1, 1
    counts[0, 29] += 0.6  # rounds to 2: wrong
    counts[1, 5] -= 0.2  # still 0
    outputs[:, head * head_dim : head * head_dim + len(TALLY_CLASSES)] = counts * per_thing
    readings: dict[int, TallyReading] = {}
    _add_tally_readings(readings, outputs, classes, head, head_dim)
    assert {n: r.kinds for n, r in readings.items()} == {0: 2 * 30 - 3, 1: 2, 2: 1}
    assert readings[1].right == 1 and readings[2].right == 1 and readings[0].right == 57
    assert readings[1].total == pytest.approx(1.6 + 1, abs=1e-5)
    table = format_tally_readings(readings)
    assert "| 1 | 2 | 1.30 | 0.30 | 50.0 % |" in table
    assert "| 2 | 1 | 2.00 | 0.00 | 100.0 % |" in table

    model, processor, dataset, examples = packed
    from_report: dict[int, TallyReading] = {}
    attention_report(
        model, processor, examples, {"evidence": 1}, progress=False, tally_readings=from_report
    )
    rows = sum(len(dataset[i][SUPERVISIONS["tally"].positions_key]) for i in range(len(dataset)))
    assert rows > 0 and sum(r.kinds for r in from_report.values()) == rows * len(TALLY_CLASSES)
    things = sum(n * r.kinds for n, r in from_report.items())
    expected = sum(
        int((dataset[i][TALLY_KEY] >= 0).sum())
        * len(dataset[i][SUPERVISIONS["tally"].positions_key])
        for i in range(len(dataset))
    )
    assert things == expected  # every tallied patch, once per question asked of its image
    assert not any(
        layer.self_attn.o_proj._forward_pre_hooks for layer in model.model.language_model.layers
    )


def test_family_weights_repeat_and_thin_images_exactly(packed) -> None:
    from collections import Counter

    from eval.testbed.training.train import PackedVQADataset

    _, processor, dataset, examples = packed
    family_of = [example.turns[0].family for example in examples]
    per_family = Counter(family_of)
    assert per_family["counting"] >= 1
    thinned = next(f for f in per_family if f != "counting")
    weighted = PackedVQADataset(
        examples,
        dataset.pixels,
        processor.tokenizer,
        dataset.image_seq_length,
        isolate_turns=True,
        family_weights={"counting": 3.0, thinned: 0.5},
    )
    shown = Counter(family_of[image_index] for image_index, _ in weighted.items)
    for family, n in per_family.items():
        expected = 3 * n if family == "counting" else math.floor(n / 2) if family == thinned else n
        assert shown[family] == expected, family
    # A repeated image is the same packed sequence, not a new draw of its questions.
    counting = [i for i, f in enumerate(family_of) if f == "counting"][0]
    copies = [turns for image_index, turns in weighted.items if image_index == counting]
    assert len(copies) == 3 and copies[0] == copies[1] == copies[2]


def test_family_weights_flag_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from eval.testbed.training.train import main, parse_family_weights

    assert parse_family_weights(" counting=3, attribute=0.5 ") == {
        "counting": 3.0,
        "attribute": 0.5,
    }
    for bad in ("counting", "counting=0", "counting=-1", "=2", "counting=x", "counting=inf"):
        with pytest.raises(ValueError, match="FAMILY=W"):
            parse_family_weights(bad)
    code = main(["--data", str(tmp_path), "--output-dir", str(tmp_path), "--family-weights", "x"])
    assert code == 2
    assert "--family-weights entry 'x'" in capsys.readouterr().err


def test_neighbour_query_moves_the_nearest_farthest_row_to_the_colour_word(packed) -> None:
    from eval.testbed.training.train import grounded_dataset

    model, processor, by_last, examples = packed
    by_colour = grounded_dataset(
        examples, processor, model.config.image_seq_length, neighbour_query="colour"
    )

    def asked_from(dataset) -> list[tuple[str, list[int]]]:
        """(query word, target patches) of every neighbour row."""
        rows = []
        for index in range(len(dataset)):
            item = dataset[index]
            tokens = processor.tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
            for slot, at in enumerate(item["neighbour_positions"].tolist()):
                patches = item["neighbour_masks"][slot].nonzero().flatten().tolist()
                rows.append((tokens[at], patches))
        return rows

    # the fixture's one "farthest from the red triangle" question, same target either way
    ((last_word, last_patches),) = asked_from(by_last)
    ((colour_word, colour_patches),) = asked_from(by_colour)
    assert (last_word, colour_word) == ("triangle", "red")
    assert last_patches == colour_patches and len(last_patches) > 0


def test_cached_vision_features_are_what_the_projector_would_get(packed) -> None:
    from eval.testbed.training.train import (
        cache_vision_features,
        collator_for,
        image_encoder_outputs,
        isolated_turns_mask,
    )

    model, processor, dataset, _ = packed
    features = cache_vision_features(
        model, dataset.pixels, processor.image_processor, batch_size=5, progress=False
    )
    width = model.config.vision_config.hidden_size
    assert features.shape == (len(dataset.pixels), model.config.image_seq_length, width)
    batch = collator_for(processor)([dataset[i] for i in range(3)])
    side = {key: batch.pop(key) for key in list(batch) if key.endswith(("_positions", "_masks"))}
    batch["attention_mask"] = isolated_turns_mask(batch.pop(TURN_IDS_KEY), model)
    pixel_values = batch.pop("pixel_values")
    assert side  # the grounded batch's targets are not model inputs
    image_indices = [dataset.items[i][0] for i in range(3)]
    with torch.no_grad():
        reference = model.model.get_image_features(pixel_values=pixel_values).pooler_output
        cached = image_encoder_outputs(model, features[image_indices])["image"].pooler_output
        torch.testing.assert_close(torch.stack(cached), torch.stack(reference))
        by_pixels = model(**batch, pixel_values=pixel_values).logits
        by_cache = model(
            **batch, mm_encoder_outputs=image_encoder_outputs(model, features[image_indices])
        ).logits
    torch.testing.assert_close(by_cache, by_pixels)
    images = len(dataset.pixels)
    with pytest.raises(ValueError, match=f"{images - 1} cached vision features for {images}"):
        dataset.use_vision_features(features[1:])


def test_train_cli_cache_vision_features_trains_the_same_steps(
    tmp_path: Path, train_testbed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from eval.testbed.training.train import main as train_main

    out = train_testbed
    argv = ["--data", str(out), "--init-reference", "--model-size", "cpu-tiny", "--no-progress"]
    argv += ["--batch-size", "4", "--max-steps", "3", "--logging-steps", "1", "--freeze-vision"]

    def losses(run: str, *flags: str) -> list[float]:
        assert train_main([*argv, "--output-dir", str(tmp_path / run), *flags]) == 0
        history = json.loads((tmp_path / run / "loss.json").read_text())["history"]
        return [row["loss"] for row in history if "loss" in row]

    by_pixels = losses("pixels")
    by_cache = losses("cached", "--cache-vision-features")
    assert len(by_cache) == 3
    torch.testing.assert_close(torch.tensor(by_cache), torch.tensor(by_pixels), rtol=1e-5, atol=0)

    flags = [a for a in argv if a != "--freeze-vision"]
    assert train_main([*flags, "--output-dir", str(tmp_path / "x"), "--cache-vision-features"]) == 2
    assert "add --freeze-vision" in capsys.readouterr().err


def test_cache_vision_features_refuses_a_tower_with_dropout(packed) -> None:
    from eval.testbed.training.train import cache_vision_features

    model, processor, dataset, _ = packed
    config = model.config.vision_config
    saved = config.attention_dropout
    config.attention_dropout = 0.1
    try:
        with pytest.raises(ValueError, match="drop --cache-vision-features"):
            cache_vision_features(model, dataset.pixels[:2], processor.image_processor)
    finally:
        config.attention_dropout = saved


def test_packed_lengths_are_the_items_lengths_without_drawing_randomness(packed) -> None:
    import random

    _, _, dataset, _ = packed
    state = random.getstate()
    lengths = dataset.lengths()
    assert random.getstate() == state  # measuring must not shift the seeded turn shuffles
    assert lengths == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def test_shuffled_length_batches_pad_least_and_mix_the_order() -> None:
    from eval.testbed.training.train import ShuffledLengthBatches

    lengths = [300, 500, 300, 420, 500, 300, 420, 300, 500, 420, 300]  # 5 x 300, 3 x 420, 3 x 500
    torch.manual_seed(0)
    sampler = ShuffledLengthBatches(lengths, batch_size=3)
    orders = [list(sampler) for _ in range(20)]
    for order in orders:
        assert sorted(order) == list(range(len(lengths)))
        batches = [[lengths[i] for i in order[s : s + 3]] for s in range(0, len(order), 3)]
        # the batches of the sorted lengths: 300x3 | 300,300,420 | 420,420,500 | 500,500
        assert sorted(map(sorted, batches[:3])) == [
            [300, 300, 300],
            [300, 300, 420],
            [420, 420, 500],
        ]
        assert batches[3] == [500, 500]  # the short batch last, so the others stay whole
    assert len({tuple(order) for order in orders}) > 1
    assert len({tuple(lengths[i] for i in order[:3]) for order in orders}) == 3  # any batch first
    torch.manual_seed(0)
    assert list(ShuffledLengthBatches(lengths, batch_size=3)) == orders[0]  # seeded
    assert list(ShuffledLengthBatches([], batch_size=3)) == []


def test_group_by_length_uses_the_packed_lengths(packed, tmp_path: Path) -> None:
    from transformers import TrainingArguments

    from eval.testbed.training.train import ShuffledLengthBatches, _trainer_class, collator_for

    model, processor, dataset, _ = packed

    def sampler(strategy: str):
        args = TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            use_cpu=True,
            report_to=[],
            train_sampling_strategy=strategy,
        )
        trainer = _trainer_class()(
            model=model, args=args, train_dataset=dataset, data_collator=collator_for(processor)
        )
        return trainer._get_train_sampler()

    grouped = sampler("group_by_length")
    assert isinstance(grouped, ShuffledLengthBatches)
    assert grouped.lengths == dataset.lengths() and grouped.batch_size == 4
    assert not isinstance(sampler("random"), ShuffledLengthBatches)


def test_train_cli_group_by_length_runs(tmp_path: Path, train_testbed: Path) -> None:
    import json

    from eval.testbed.training.train import main as train_main

    argv = ["--data", str(train_testbed), "--init-reference", "--model-size", "cpu-tiny"]
    argv += ["--no-progress", "--batch-size", "4", "--max-steps", "2", "--logging-steps", "1"]
    assert train_main([*argv, "--group-by-length", "--output-dir", str(tmp_path / "g")]) == 0
    history = json.loads((tmp_path / "g" / "loss.json").read_text())["history"]
    assert len([row for row in history if "loss" in row]) == 2
