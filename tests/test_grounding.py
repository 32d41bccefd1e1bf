"""Word-to-patch grounding: which patches a question word names, the loss against a naive
eager-attention reference, the dataset's positions, and the training CLI with the loss on."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.testbed import data
from eval.testbed.model import build_reference
from eval.testbed.patch_labels import (
    LABEL_CLASSES,
    attention_targets,
    count_targets,
    evidence_phrases,
    option_words,
    tally_classes,
    word_patch_targets,
)
from eval.testbed.training.grounding import (
    MASKS_KEY,
    POSITIONS_KEY,
    SUPERVISIONS,
    GroundingLoss,
    patch_centres,
)

N = 16


def _labels() -> dict[str, np.ndarray]:
    labels = {name: np.zeros(N, dtype=np.int64) for name in LABEL_CLASSES}
    labels["colour"][[1, 2]] = 1 + data.COLOURS.index("red")
    labels["shape"][[1, 2]] = 1 + data.SHAPES.index("circle")
    labels["colour"][[5]] = 1 + data.COLOURS.index("blue")
    labels["shape"][[5]] = LABEL_CLASSES["shape"].index("dot")
    labels["digit"][[9, 10]] = 1 + data.DIGITS.index("7")
    labels["digit"][[13]] = 1 + data.DIGITS.index("2")
    labels["cell_row"] = np.zeros(N, dtype=np.int64)
    labels["cell_column"] = np.zeros(N, dtype=np.int64)
    labels["cell_row"][[9, 10]], labels["cell_column"][[9, 10]] = 1, 2
    labels["cell_row"][[13]], labels["cell_column"][[13]] = 2, 2
    labels["digit_centre"] = np.zeros(N, dtype=np.int64)
    labels["digit_centre"][[10]] = 1 + data.DIGITS.index("7")
    labels["digit_centre"][[13]] = 1 + data.DIGITS.index("2")
    labels["char"][[14, 15]] = 1
    return labels


def _words(text: str) -> list[str]:
    return text.split(" ")


def _targets(words: list[str], keep_absent: bool = False) -> dict[int, list[int]]:
    found = word_patch_targets(words, _labels(), keep_absent)
    return {i: np.flatnonzero(mask).tolist() for i, mask in found}


def test_word_patch_targets_names_the_right_patches() -> None:
    words = _words("what color is the circle ? how many red circles , blue dot , green")
    assert _targets(words) == {4: [1, 2], 8: [1, 2], 9: [1, 2], 11: [5], 12: [5]}
    # green is absent: no target, or an empty one when asked to keep absent words
    assert _targets(words, keep_absent=True)[14] == []
    digits = _words("how many cells show the digit 7 ? 7")
    assert _targets(digits) == {6: [9, 10]}  # a bare 7 names nothing
    cells = _words("what digit is in row 2 column 2 ? what is the code ?")
    assert _targets(cells) == {5: [13], 7: [9, 10, 13], 12: [14, 15]}


@pytest.mark.parametrize(
    "question,expected",
    [
        ("what color is the circle ?", [[1, 2]]),
        ("how many red circles are there ?", [[1, 2]]),
        ("what digit is in row 2 column 2 ?", [[13]]),  # row and column intersect
        ("where is the red circle relative to the blue dot ?", [[1, 2], [5]]),  # in order
        ("what color is the circle ? ( a ) red ( b ) blue", [[1, 2]]),  # options ignored
        ("how many green circles are there ?", []),  # zero: nothing to look at
        ("is there a blue circle ?", []),  # absent conjunction
        ("what color is the object nearest to the red circle ?", [[1, 2]]),  # the anchor
    ],
)
def test_evidence_phrases(question: str, expected: list[list[int]]) -> None:
    words = _words(question)
    phrases = evidence_phrases(words, word_patch_targets(words, _labels(), keep_absent=True))
    assert [np.flatnonzero(mask).tolist() for mask in phrases] == expected


def test_count_targets_are_one_patch_per_thing() -> None:
    labels = _labels()
    labels["centre"][[1, 3, 5]] = 1  # a red circle at 1-2, a second one at 3, the blue dot at 5
    labels["colour"][3] = 1 + data.COLOURS.index("red")
    labels["shape"][3] = 1 + data.SHAPES.index("circle")

    def count(question: str) -> list[int] | None:
        found = count_targets(_words(question), labels)
        return None if found is None else np.flatnonzero(found).tolist()

    assert count("how many red circles are there ?") == [1, 3]  # centres, not every patch
    assert count("how many green circles are there ?") == []  # zero: the sink alone
    assert count("how many cells show the digit 7 ?") == [10]
    assert count("how many red circles are there ? ( a ) 2 ( b ) 3") == [1, 3]
    assert count("what color is the circle ?") is None


def test_attention_targets_of_a_multiple_choice_question() -> None:
    words = _words("user : what color is the circle ? ( a ) red ( b ) blue ( c ) green assistant :")
    targets = attention_targets(words, _labels(), "a")
    answer_at = len(words) - 1
    assert option_words(words) == {"a": 11, "b": 15, "c": 19}
    assert targets["letter"] == [(11, [9]), (15, [13]), (19, [17])]
    assert targets["option"] == [(answer_at, [11])]  # "red", the option whose letter is "a"
    assert targets["question"] == targets["readout"] == [(answer_at, [6])]  # not the options
    grounded = {i: np.flatnonzero(m).tolist() for i, m in targets["grounding"]}
    assert grounded == {6: [1, 2], 11: [1, 2], 15: [5]}  # absent "green" names nothing
    assert [(i, np.flatnonzero(m).tolist()) for i, m in targets["evidence"]] == [
        (answer_at, [1, 2])
    ]
    assert "second" not in targets and "count" not in targets and "question2" not in targets

    relation = _words("user : where is the red circle relative to the blue dot ? assistant :")
    targets = attention_targets(relation, _labels(), "left")
    assert np.flatnonzero(targets["evidence"][0][1]).tolist() == [1, 2]
    assert np.flatnonzero(targets["second"][0][1]).tolist() == [5]
    assert targets["question"] == [(len(relation) - 1, [5, 6])]  # "red circle"
    assert targets["question2"] == [(len(relation) - 1, [10, 11])]  # "blue dot"
    assert "option" not in targets and "letter" not in targets

    nearest = _words("user : what color is the object nearest to the red circle ? assistant :")
    targets = attention_targets(nearest, _labels(), "blue")
    ((anchor, found),) = targets["neighbour"]
    assert nearest[anchor] == "circle" and np.flatnonzero(found).tolist() == [5]  # blue's patch
    ((by_colour, found_too),) = attention_targets(nearest, _labels(), "blue", "colour")["neighbour"]
    assert nearest[by_colour] == "red" and (found_too == found).all()
    with pytest.raises(ValueError, match="neighbour_query must be one of"):
        attention_targets(nearest, _labels(), "blue", "shape")

    cell = _words("user : what digit is in row 2 column 2 ? assistant :")
    targets = attention_targets(cell, _labels(), "2")
    assert targets["question"] == [(len(cell) - 1, [7])] and targets["question2"][0][1] == [9]

    code = _words("user : what is the code ? assistant :")
    labels = _labels()
    labels["char"][[14, 15]] = [
        LABEL_CLASSES["char"].index(c) for c in (data.CODE_LETTERS[0], data.CODE_DIGITS[0])
    ]
    targets = attention_targets(code, labels, "k3")
    assert np.flatnonzero(targets["evidence"][0][1]).tolist() == [14]  # the letter
    assert np.flatnonzero(targets["second"][0][1]).tolist() == [15]  # then the digit

    absent = _words("user : how many green circles are there ? assistant :")
    targets = attention_targets(absent, _labels(), "0")
    assert targets["question"] == [(len(absent) - 1, [4, 5])]  # absent "green" is still asked
    assert not targets["count"][0][1].any() and "evidence" not in targets


def _naive_loss(attentions: torch.Tensor, ids: torch.Tensor, positions, masks, heads, image_id):
    terms = []
    for b in range(ids.shape[0]):
        image = (ids[b] == image_id).nonzero().flatten()
        for k in range(positions.shape[1]):
            if positions[b, k] < 0:
                continue
            for h in range(heads):
                row = attentions[b, h, positions[b, k], image]
                terms.append(-torch.log(row[masks[b, k]].sum()))
    return torch.stack(terms).mean()


def _eager_tiny_and_ids(question: str, rows: int = 1) -> tuple[object, torch.Tensor]:
    """The 16-patch cpu-tiny LLaVA with eager attention (so it returns attention weights) and
    BOS + image + `question` token ids, `rows` times."""
    model, processor = build_reference(size="cpu-tiny", image_size=56, seed=0)
    model.config.text_config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    tokenizer = processor.tokenizer
    words = tokenizer.encode(f"USER: {question} ASSISTANT:", add_special_tokens=False)
    image = [model.config.image_token_id] * N
    return model, torch.tensor([[tokenizer.bos_token_id] + image + words] * rows)


@pytest.mark.parametrize("layer,heads", [(0, 1), (0, 2)])
def test_grounding_loss_matches_eager_attention(layer: int, heads: int) -> None:
    torch.manual_seed(0)
    model, ids = _eager_tiny_and_ids("what color is the red circle ?", rows=2)
    image_id, pad_id = model.config.image_token_id, model.config.pad_token_id
    ids[1, -1] = pad_id
    attention_mask = (ids != pad_id).long()
    positions = torch.tensor([[1 + N + 5, 1 + N + 6], [1 + N + 6, -1]])
    masks = torch.rand(2, 2, N) > 0.5
    masks[..., 0] = True
    pixels = torch.randn(2, 3, 56, 56)
    term = GroundingLoss(model, weight=0.5, layer=layer, heads=heads)
    out = model(
        input_ids=ids, attention_mask=attention_mask, pixel_values=pixels, output_attentions=True
    )
    got = term(model, {"input_ids": ids, POSITIONS_KEY: positions, MASKS_KEY: masks}, out)
    expected = 0.5 * _naive_loss(out.attentions[layer], ids, positions, masks, heads, image_id)
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)

    got.backward()
    attention = model.model.language_model.layers[layer].self_attn
    assert attention.q_proj.weight.grad.abs().sum() > 0
    assert attention.k_proj.weight.grad.abs().sum() > 0
    term.remove()


def test_readout_loss_matches_eager_attention() -> None:
    """Targets over sequence positions (the question's words), on the last layer's head 1."""
    torch.manual_seed(1)
    model, ids = _eager_tiny_and_ids("is there a red circle ?")
    length = ids.shape[1]
    positions = torch.tensor([[length - 1]])
    masks = torch.zeros(1, 1, length, dtype=torch.bool)
    masks[0, 0, [1 + N + 4, 1 + N + 5]] = True  # "red", "circle"
    term = GroundingLoss(
        model,
        2.0,
        layer=-1,
        heads=1,
        positions_key="p",
        masks_key="m",
        first_head=1,
        over_patches=False,
    )
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56), output_attentions=True)
    got = term(model, {"input_ids": ids, "p": positions, "m": masks}, out)
    attention = out.attentions[-1][0, 1, length - 1]
    expected = -2.0 * torch.log(attention[masks[0, 0]].sum())
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    term.remove()


def test_count_loss_matches_eager_attention() -> None:
    """Uniform target over BOS + the named patches: -mean(log attention) over that set."""
    torch.manual_seed(2)
    model, ids = _eager_tiny_and_ids("how many red circles are there ?", rows=2)
    answer_at = ids.shape[1] - 1
    positions = torch.tensor([[answer_at], [answer_at]])
    masks = torch.zeros(2, 1, N, dtype=torch.bool)
    masks[0, 0, [2, 7, 11]] = True  # three things to count; the second row counts zero
    count = SUPERVISIONS["count"]
    term = GroundingLoss(
        model, 1.5, -1, 1, "p", "m", count.head, count.over_patches, count.uniform, count.sink
    )
    out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 56, 56), output_attentions=True)
    got = term(model, {"input_ids": ids, "p": positions, "m": masks}, out)
    attention = out.attentions[-1][:, count.head, answer_at]  # (2, T)
    three = torch.log(attention[0, [0, 1 + 2, 1 + 7, 1 + 11]]).mean()
    zero = torch.log(attention[1, 0])
    expected = -1.5 * (three + zero) / 2
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    term.remove()
    # BOS counted as 4 things: cross-entropy against (4, 1, 1, 1) / 7; zero things: BOS alone.
    heavy = GroundingLoss.for_supervision(model, replace(count, sink_weight=4.0), 1.5, -1)
    heavy.positions_key, heavy.masks_key = "p", "m"
    out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 56, 56), output_attentions=True)
    got = heavy(model, {"input_ids": ids, "p": positions, "m": masks}, out)
    attention = out.attentions[-1][:, count.head, answer_at]
    logs = torch.log(attention[0, [0, 1 + 2, 1 + 7, 1 + 11]])
    three = (4 * logs[0] + logs[1:].sum()) / 7
    expected = -1.5 * (three + torch.log(attention[1, 0])) / 2
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    heavy.remove()
    with pytest.raises(ValueError, match="sink"):
        GroundingLoss(model, 1.0, over_patches=False, sink=True)
    with pytest.raises(ValueError, match="sink weight needs"):
        GroundingLoss(model, 1.0, sink_weight=2.0)
    with pytest.raises(ValueError, match="must be > 0"):
        GroundingLoss(model, 1.0, sink=True, uniform=True, sink_weight=0.0)


def test_coordinate_loss_matches_the_heads_output_before_o_proj() -> None:
    """The attention term plus the squared error between the head's first two output channels
    (read from o_proj's input in an eager forward) and the targets' centre, by a naive loop."""
    torch.manual_seed(3)
    model, ids = _eager_tiny_and_ids("where is the red circle relative to the blue square ?", 2)
    answer_at = ids.shape[1] - 1
    positions = torch.tensor([[answer_at, answer_at - 2], [answer_at, -1]])
    masks = torch.zeros(2, 2, N, dtype=torch.bool)
    masks[0, 0, [0, 1, 4, 5]] = True  # rows 0-1, columns 0-1 of the 4x4 grid
    masks[0, 1, [15]] = True
    masks[1, 0, [6, 10]] = True  # column 2, rows 1-2
    evidence = SUPERVISIONS["evidence"]
    attention = model.model.language_model.layers[-1].self_attn
    captured = {}
    hook = attention.o_proj.register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
    term = GroundingLoss.for_supervision(model, evidence, 0.5, -1, coordinate_weight=2.0)
    out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 56, 56), output_attentions=True)
    inputs = {"input_ids": ids, evidence.positions_key: positions, evidence.masks_key: masks}
    got = term(model, inputs, out)
    hook.remove()
    image_id = model.config.image_token_id
    attention_term = _naive_loss(
        out.attentions[-1][:, evidence.head : evidence.head + 1],
        ids,
        positions,
        masks,
        1,
        image_id,
    )
    d = attention.head_dim
    errors = []
    for b in range(2):
        for k in range(2):
            if positions[b, k] < 0:
                continue
            patches = masks[b, k].nonzero().flatten().tolist()
            mean = torch.tensor([sum(p // 4 for p in patches), sum(p % 4 for p in patches)])
            centre = mean / len(patches) * (2 / 3) - 1  # grid rows/columns 0..3 -> -1..1
            read = captured["x"][b, positions[b, k], evidence.head * d : evidence.head * d + 2]
            errors.append(((read - centre) ** 2).sum())
    expected = 0.5 * attention_term + 2.0 * torch.stack(errors).mean()
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    got.backward()
    assert attention.v_proj.weight.grad.abs().sum() > 0  # the values learn to carry positions
    term.remove()
    assert patch_centres(torch.zeros(1, 16, dtype=torch.bool)).tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="square grid"):
        patch_centres(torch.ones(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="over_patches"):
        GroundingLoss(model, 1.0, over_patches=False, coordinate_weight=1.0)


def test_grounding_loss_rejects_bad_layer() -> None:
    model, _ = build_reference(size="cpu-tiny", image_size=56, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        GroundingLoss(model, 1.0, layer=5)
    with pytest.raises(ValueError, match="must lie in"):
        GroundingLoss(model, 1.0, heads=9)


def test_dataset_grounding_positions_point_at_grounded_words(tmp_path: Path) -> None:
    from eval.testbed.training.train import (
        PackedVQADataset,
        cache_pixels,
        collator_for,
        load_examples,
        patch_label_sets_for,
    )

    out = data.export(
        data.make_dataset_dict(train=21, validation=0, test=0, seed=4, train_questions_per_image=3),
        tmp_path / "data",
    )
    _, processor = build_reference(size="cpu-tiny", seed=0)
    examples = load_examples(out, "train")
    pixels = cache_pixels(examples, processor.image_processor, progress=False)
    label_sets = patch_label_sets_for(examples, pixels)
    dataset = PackedVQADataset(
        examples, pixels, processor.tokenizer, 256, patch_label_sets=label_sets
    )
    vocabulary = set(data.COLOURS + data.SHAPES + tuple(data.SHAPE_PLURALS.values()))
    vocabulary |= {"dot", "code", *data.DIGITS}
    seen = 0
    for index in range(len(dataset)):
        item = dataset[index]
        image_index = dataset.items[index][0]
        tokens = processor.tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
        for position, mask in zip(item[POSITIONS_KEY].tolist(), item[MASKS_KEY], strict=True):
            word = tokens[position]
            assert word in vocabulary
            assert mask.any()
            expected = dict(
                word_patch_targets([tokens[position - 1], word], label_sets[image_index])
            )
            assert torch.equal(mask, torch.from_numpy(expected[1]))
            seen += 1
    assert seen > 10
    evidence, count, readout, letter, option = (
        SUPERVISIONS[name] for name in ("evidence", "count", "readout", "letter", "option")
    )
    answers = 0
    for index in range(len(dataset)):
        item = dataset[index]
        for supervision in (evidence, count, option):
            for position in item[supervision.positions_key].tolist():
                # the prompt's last token, whose next token is the first answer token
                assert item["labels"][position] == -100 and item["labels"][position + 1] != -100
                answers += 1
            assert len(item[supervision.masks_key]) == len(item[supervision.positions_key])
    assert answers > 5
    readouts = options = 0
    for index in range(len(dataset)):
        item = dataset[index]
        tokens = processor.tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
        for position, mask in zip(
            item[letter.positions_key].tolist(), item[letter.masks_key], strict=True
        ):
            assert tokens[position - 1] == ")" and mask.nonzero().flatten().tolist() == [
                position - 2
            ]
        for position, mask in zip(
            item[option.positions_key].tolist(), item[option.masks_key], strict=True
        ):
            (word,) = mask.nonzero().flatten().tolist()
            answer = processor.tokenizer.convert_ids_to_tokens([int(item["labels"][position + 1])])
            assert answer == [tokens[word - 2]] and answer[0] in data.LETTERS
            options += 1
        assert item[readout.masks_key].shape == (len(item[readout.positions_key]), len(tokens))
        for position, mask in zip(
            item[readout.positions_key].tolist(), item[readout.masks_key], strict=True
        ):
            assert tokens[position] == ":" and item["labels"][position + 1] != -100
            question_start = max(i for i in range(position) if tokens[i] == "user")
            for word_position in mask.nonzero().flatten().tolist():
                assert question_start < word_position < position
                assert tokens[word_position] in vocabulary
                assert "(" not in tokens[question_start:word_position]  # not an option
            readouts += 1
    assert readouts > 5 and options >= 1
    batch = collator_for(processor)([dataset[0], dataset[1]])
    assert batch[POSITIONS_KEY].shape[0] == 2 and batch[MASKS_KEY].shape[-1] == 256
    assert batch[MASKS_KEY][batch[POSITIONS_KEY] < 0].sum() == 0
    from eval.testbed.training.grounding import TALLY_KEY

    first = dataset.items[0][0]
    assert batch[TALLY_KEY].shape == (2, 256)
    assert torch.equal(batch[TALLY_KEY][0], torch.from_numpy(tally_classes(label_sets[first])))


def test_train_cli_with_grounding(tmp_path: Path, train_testbed: Path) -> None:
    from eval.testbed.training.train import main as train_main

    out = train_testbed
    run = tmp_path / "run"
    # cpu-small: the supervisions use LLM heads 0-3 (cpu-tiny has two)
    argv = ["--data", str(out), "--init-reference", "--model-size", "cpu-small", "--no-progress"]
    argv += ["--output-dir", str(run), "--batch-size", "4", "--max-steps", "2"]
    argv += ["--logging-steps", "1"]
    weights = [f"--{name}-weight" for name in ("grounding", "question", "letter", "readout")]
    weights += [f"--{name}-weight" for name in ("evidence", "count", "option", "tally")]
    assert train_main([*argv, *(x for flag in weights for x in (flag, "1.0"))]) == 0
    history = [r for r in json.loads((run / "loss.json").read_text())["history"] if "loss" in r]
    assert len(history) == 2 and all(np.isfinite(row["loss"]) for row in history)

    plain = tmp_path / "plain"
    assert train_main([a if a != str(run) else str(plain) for a in argv]) == 0
    plain_history = [
        r for r in json.loads((plain / "loss.json").read_text())["history"] if "loss" in r
    ]
    # Same seed and data: the logged loss differs only by the grounding term.
    assert history[0]["loss"] > plain_history[0]["loss"]

    tiny = [a if a != "cpu-small" else "cpu-tiny" for a in argv]
    tiny[tiny.index(str(run))] = str(tmp_path / "tiny")
    with pytest.raises(ValueError, match="--option-weight supervises the 'option' attention"):
        train_main([*tiny, "--option-weight", "1.0"])


def test_train_cli_grounding_needs_metadata(tmp_path: Path) -> None:
    from eval.testbed.training.train import main as train_main

    out = data.export(
        data.make_dataset_dict(train=4, validation=0, test=0, seed=3), tmp_path / "data"
    )
    argv = ["--data", str(out / "llava" / "train.json"), "--init-reference"]
    argv += ["--model-size", "cpu-tiny", "--output-dir", str(tmp_path / "run"), "--no-progress"]
    argv += ["--max-steps", "1", "--grounding-weight", "1.0"]
    with pytest.raises(ValueError, match="scene metadata"):
        train_main(argv)


def test_coordinate_weight_without_evidence_heads_is_refused() -> None:
    from eval.testbed.training.train import build_parser, grounding_losses

    model, _ = build_reference(size="cpu-small", image_size=56, seed=0)  # 4 heads: room for both
    args = build_parser().parse_args(
        ["--data", "d", "--output-dir", "o", "--coordinate-weight", "1"]
    )
    with pytest.raises(ValueError, match="pass --evidence-weight > 0"):
        grounding_losses(model, args)
    args.evidence_weight = 1.0
    losses = grounding_losses(model, args)
    assert sorted(loss.coordinate_weight for loss in losses) == [1.0, 1.0]  # evidence, second


def test_count_head_moves_the_count_loss() -> None:
    from eval.testbed.training.train import build_parser, grounding_losses

    model, _ = build_reference(size="cpu-small", image_size=56, seed=0)  # 4 heads
    flags = ["--data", "d", "--output-dir", "o", "--count-weight", "1", "--evidence-layer", "1"]
    (default,) = grounding_losses(model, build_parser().parse_args(flags))
    assert (default.layer, default.first_head) == (1, SUPERVISIONS["count"].head)
    (moved,) = grounding_losses(model, build_parser().parse_args([*flags, "--count-head", "0"]))
    assert (moved.layer, moved.first_head, moved.uniform, moved.sink) == (1, 0, True, True)
    assert (default.sink_weight, moved.sink_weight) == (1.0, 1.0)
    (heavy,) = grounding_losses(
        model, build_parser().parse_args([*flags, "--count-sink-weight", "4"])
    )
    assert heavy.sink_weight == 4.0
    with pytest.raises(ValueError, match=r"--count-weight supervises.*0\.\.3"):
        grounding_losses(model, build_parser().parse_args([*flags, "--count-head", "4"]))


def test_grounding_coordinates_flag_moves_positions_into_the_grounding_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from eval.testbed.training.train import build_parser, grounding_losses, main

    model, _ = build_reference(size="cpu-small", image_size=56, seed=0)
    flags = ["--data", "d", "--output-dir", "o", "--grounding-weight", "1"]
    flags += ["--evidence-weight", "1", "--coordinate-weight", "0.5"]
    plain = {
        loss.first_head: loss for loss in grounding_losses(model, build_parser().parse_args(flags))
    }
    assert plain[0].layer == 0 and plain[0].coordinate_weight == 0.0
    moved = grounding_losses(model, build_parser().parse_args([*flags, "--grounding-coordinates"]))
    grounding = next(loss for loss in moved if loss.layer == 0 and loss.first_head == 0)
    assert grounding.coordinate_weight == 0.5
    assert (
        main(
            [
                "--data",
                str(tmp_path),
                "--output-dir",
                str(tmp_path / "o"),
                "--grounding-coordinates",
            ]
        )
        == 2
    )
    assert "pass --grounding-weight > 0 and --coordinate-weight > 0" in capsys.readouterr().err


@pytest.mark.parametrize("weight", ["0", "-1"])
def test_count_sink_weight_must_be_positive(
    tmp_path: Path, weight: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from eval.testbed.training.train import main

    flags = ["--data", str(tmp_path), "--output-dir", str(tmp_path / "o")]
    assert main([*flags, "--count-sink-weight", weight]) == 2
    err = capsys.readouterr().err
    assert "--count-sink-weight must be > 0" in err and "pass 1" in err
    assert "larger LLM" not in err and not (tmp_path / "o").exists()


def _packed_training_batch(tmp_path: Path, images: int) -> tuple[object, object, dict, dict]:
    """A fresh cpu-small model (eval mode), its processor, and one packed training batch of
    `images` testbed images (4 questions each): model inputs with the isolated-turns mask, and
    the side inputs the extra losses read."""
    from eval.testbed.training.grounding import SIDE_KEYS
    from eval.testbed.training.train import (
        collator_for,
        grounded_dataset,
        isolated_turns_mask,
        load_examples,
    )

    out = data.export(
        data.make_dataset_dict(
            train=images, validation=0, test=0, seed=6, train_questions_per_image=4
        ),
        tmp_path / "data",
    )
    model, processor = build_reference(size="cpu-small", image_size=224, seed=0)
    model.eval()
    dataset = grounded_dataset(load_examples(out, "train"), processor, 256)
    batch = collator_for(processor)([dataset[i] for i in range(len(dataset))])
    side = {key: batch.pop(key) for key in SIDE_KEYS}
    batch["attention_mask"] = isolated_turns_mask(side["turn_ids"], model)
    return model, processor, batch, side


def test_early_answer_loss_matches_a_naive_logit_lens(tmp_path: Path) -> None:
    """Cross-entropy of the LM head on the residual after layer -2, at every answer position,
    against the answer word; for a multiple-choice question, the right option's word."""
    from eval.testbed.training.grounding import EarlyAnswerLoss

    model, processor, batch, side = _packed_training_batch(tmp_path, 70)
    term = EarlyAnswerLoss(model, weight=0.5)
    with torch.no_grad():
        outputs = model(**batch, output_hidden_states=True)
        loss = term(model, {**batch, **side}, outputs)
    term.remove()

    language_model = model.model.language_model
    after = outputs.hidden_states[len(language_model.layers) - 1]  # output of layer -2
    tokenizer = processor.tokenizer
    logits, wanted, multiple_choice = [], [], 0
    for row in range(batch["input_ids"].shape[0]):
        labels = batch["labels"][row].tolist()
        words = tokenizer.convert_ids_to_tokens(batch["input_ids"][row].tolist())
        for t in range(len(labels) - 1):
            if labels[t] != -100 or labels[t + 1] == -100:
                continue
            answer = tokenizer.convert_ids_to_tokens([labels[t + 1]])[0]
            target = labels[t + 1]
            # this turn's options: "( a ) red" just before t
            start = max(i for i in range(t) if words[i] == "?")
            options = {words[i + 1]: i + 3 for i in range(start, t) if words[i] == "("}
            if answer in options:
                target = int(batch["input_ids"][row, options[answer]])
                multiple_choice += 1
            with torch.no_grad():
                logits.append(model.lm_head(language_model.norm(after[row, t])))
            wanted.append(target)
    assert multiple_choice >= 4 and len(wanted) == 70
    expected = 0.5 * torch.nn.functional.cross_entropy(torch.stack(logits), torch.tensor(wanted))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="before the last"):
        EarlyAnswerLoss(model, weight=1.0, layer=-1)


def test_option_head_forcing_matches_one_hot_attention(tmp_path: Path) -> None:
    """While prepared, the model's logits are those of eager attention whose option head (last
    layer, head 3) is one-hot on the right option word at each multiple-choice answer; after
    `release()` they are the unforced model's, bit for bit."""
    from transformers import AttentionInterface

    from eval.testbed.training.grounding import SUPERVISIONS, OptionHeadForcing

    model, processor, batch, side = _packed_training_batch(tmp_path, 40)
    option = SUPERVISIONS["option"]
    rows, slots = (side[option.positions_key] >= 0).nonzero(as_tuple=True)
    answer_at = side[option.positions_key][rows, slots]
    word_at = side[option.masks_key][rows, slots].float().argmax(dim=-1)
    assert rows.numel() >= 3
    with torch.no_grad():
        plain = model(**batch).logits

    last = len(model.model.language_model.layers) - 1

    def one_hot_option(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        scores = query @ key.transpose(2, 3) * scaling
        if attention_mask is not None:  # the isolated-turns mask is boolean (built for sdpa)
            scores = scores.masked_fill(~attention_mask[..., : key.shape[-2]], float("-inf"))
        weights = scores.float().softmax(dim=-1).to(query.dtype)
        if getattr(module, "layer_idx", None) == last:
            weights = weights.clone()
            weights[rows, option.head, answer_at] = 0.0
            weights[rows, option.head, answer_at, word_at] = 1.0
        return (weights @ value).transpose(1, 2).contiguous(), weights

    AttentionInterface.register("test_one_hot_option", one_hot_option)
    model.set_attn_implementation("test_one_hot_option")
    with torch.no_grad():
        expected = model(**batch).logits
    model.set_attn_implementation("sdpa")

    forcing = OptionHeadForcing(model)
    forcing.prepare({**batch, **side})
    with torch.no_grad():
        forced = model(**batch).logits
    forcing.release()
    with torch.no_grad():
        released = model(**batch).logits
    forcing.remove()
    torch.testing.assert_close(forced, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(forced, plain, atol=1e-3)
    assert torch.equal(released, plain)

    with pytest.raises(RuntimeError, match="--option-weight"):
        OptionHeadForcing(model).prepare(batch)


def test_option_letter_loss_matches_a_naive_readout(tmp_path: Path) -> None:
    """Cross-entropy of the LM head on the option head's value at each option word, through that
    head's slice of o_proj and the final norm, against the option's letter."""
    from eval.testbed.training.grounding import OptionLetterLoss

    model, processor, batch, side = _packed_training_batch(tmp_path, 40)
    term = OptionLetterLoss(model, weight=0.5)
    with torch.no_grad():
        outputs = model(**batch, output_hidden_states=True)
        loss = term(model, {**batch, **side}, outputs)
    term.remove()

    language_model = model.model.language_model
    last = language_model.layers[-1]
    d = last.self_attn.head_dim
    tokenizer = processor.tokenizer
    logits, wanted = [], []
    with torch.no_grad():
        normed = last.input_layernorm(outputs.hidden_states[len(language_model.layers) - 1])
        for row in range(batch["input_ids"].shape[0]):
            words = tokenizer.convert_ids_to_tokens(batch["input_ids"][row].tolist())
            for i in range(len(words) - 3):
                if words[i] == "(" and words[i + 2] == ")" and words[i + 1] in "abcd":
                    value = last.self_attn.v_proj.weight[3 * d : 4 * d] @ normed[row, i + 3]
                    read = last.self_attn.o_proj.weight[:, 3 * d : 4 * d] @ value
                    logits.append(model.lm_head(language_model.norm(read)))
                    wanted.append(int(batch["input_ids"][row, i + 1]))
    assert len(wanted) >= 12 and len(wanted) % 4 == 0
    expected = 0.5 * torch.nn.functional.cross_entropy(torch.stack(logits), torch.tensor(wanted))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)

    with pytest.raises(RuntimeError, match="--letter-weight"):
        OptionLetterLoss(model, weight=1.0)(model, batch, outputs)


def test_answer_path_flags_need_their_supervision() -> None:
    from eval.testbed.training.grounding import OptionHeadForcing, OptionLetterLoss
    from eval.testbed.training.train import answer_path_terms, build_parser

    model, _ = build_reference(size="cpu-small", image_size=56, seed=0)
    base = ["--data", "d", "--output-dir", "o"]
    parse = build_parser().parse_args
    with pytest.raises(ValueError, match="pass --letter-weight > 0"):
        answer_path_terms(model, parse([*base, "--option-letter-weight", "1"]))
    with pytest.raises(ValueError, match="pass --option-weight > 0"):
        answer_path_terms(model, parse([*base, "--force-option-head"]))
    flags = [*base, "--letter-weight", "1", "--option-weight", "1", "--option-letter-weight", "2"]
    losses, forcings = answer_path_terms(model, parse([*flags, "--force-option-head"]))
    assert [type(t) for t in losses] == [OptionLetterLoss] and losses[0].weight == 2.0
    assert [type(f) for f in forcings] == [OptionHeadForcing]
    assert answer_path_terms(model, parse(base)) == ([], [])


def test_tally_classes_count_every_thing_in_generated_scenes() -> None:
    """Summed over patches, the tally classes give each colour-and-shape's and each digit's
    count in the scene's metadata, exactly (counting scenes hold up to 27 objects)."""
    from collections import Counter

    from eval.testbed.patch_labels import TALLY_CLASSES, patch_labels, tally_classes

    split = data.make_dataset_dict(train=42, validation=0, test=0, seed=11)["train"]
    checked = set()
    for row in split:
        if row["family"] not in ("counting", "text", "attribute", "existence"):
            continue
        meta = json.loads(row["meta"])
        labels = patch_labels(meta, np.asarray(row["image"].convert("RGB")))
        classes = tally_classes(labels)
        assert np.array_equal(labels["tally"], classes + 1)  # the stage-1 label, 0 = none
        got = Counter(TALLY_CLASSES[c] for c in classes.tolist() if c >= 0)
        expected = Counter(f"{o['colour']} {o['shape']}" for o in meta.get("objects", []))
        expected.update(f"digit {g['digit']}" for g in meta.get("digits", []))
        assert got == expected, (row["family"], row["question"])
        checked.add(row["family"])
    assert checked == {"counting", "text", "attribute", "existence"}
    assert len(TALLY_CLASSES) == len(data.COLOURS) * len(data.SHAPES) + len(data.DIGITS)


def test_tally_loss_matches_a_naive_histogram(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uniform attention over the patches, plus the Huber error between the head's first
    channels (o_proj's input, eager forward) read as counts and each image's histogram of
    tally classes, counted by hand, plus each patch's value against its own class."""
    from eval.testbed import model as testbed_model
    from eval.testbed.patch_labels import TALLY_CLASSES
    from eval.testbed.training.grounding import TALLY_KEY, TALLY_VALUE

    # cpu-tiny's 16-wide heads cannot hold the 30 tally channels: two 32-wide ones can
    wide = replace(testbed_model.MODEL_SIZES["cpu-tiny"], text_width=64)
    monkeypatch.setitem(testbed_model.MODEL_SIZES, "cpu-tiny", wide)
    torch.manual_seed(4)
    model, ids = _eager_tiny_and_ids("how many red circles are there ?", rows=2)
    answer_at = ids.shape[1] - 1
    tally = SUPERVISIONS["tally"]
    positions = torch.tensor([[answer_at], [answer_at]])
    masks = torch.ones(2, 1, N, dtype=torch.bool)
    classes = torch.full((2, N), -1)
    classes[0, [1, 6, 9]] = torch.tensor([3, 3, 29])  # two of class 3, one of class 29
    classes[1, 15] = 0
    attention = model.model.language_model.layers[-1].self_attn
    captured = {}
    hook = attention.o_proj.register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
    value_hook = attention.v_proj.register_forward_hook(lambda m, a, o: captured.update(v=o))
    term = GroundingLoss.for_supervision(model, tally, 0.7, -1, tally_weight=0.7)
    out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 56, 56), output_attentions=True)
    inputs = {"input_ids": ids, tally.positions_key: positions, tally.masks_key: masks}
    got = term(model, {**inputs, TALLY_KEY: classes}, out)
    hook.remove()
    value_hook.remove()
    image = 1 + torch.arange(N)
    weights = out.attentions[-1][:, tally.head, answer_at]  # (2, T)
    uniform = -torch.log(weights[:, image]).mean()
    d, channels = attention.head_dim, len(TALLY_CLASSES)
    errors = []
    for b in range(2):
        histogram = torch.zeros(channels)
        for c in classes[b].tolist():
            if c >= 0:
                histogram[c] += 1
        read = captured["x"][b, answer_at, tally.head * d : tally.head * d + channels]
        gap = (read * N / TALLY_VALUE - histogram).abs()  # in things
        errors.append(torch.where(gap < 1, 0.5 * gap**2, gap - 0.5).sum() * TALLY_VALUE / N)
    per_patch = []
    values = captured["v"][:, 1 : 1 + N, tally.head * d : tally.head * d + channels]
    for b in range(2):
        for p in range(N):
            own = torch.zeros(channels)
            if classes[b, p] >= 0:
                own[classes[b, p]] = 1
            per_patch.append(((values[b, p] / TALLY_VALUE - own) ** 2).sum())
    per_image = torch.stack(per_patch).view(2, N).sum(dim=1).mean()
    expected = 0.7 * uniform + 0.7 * (torch.stack(errors).mean() + per_image)
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)
    got.backward()
    assert attention.v_proj.weight.grad.abs().sum() > 0  # the values learn to carry the tally
    term.remove()
    with pytest.raises(RuntimeError, match="tally_classes"):
        term = GroundingLoss.for_supervision(model, tally, 1.0, -1, tally_weight=1.0)
        term(model, inputs, model(input_ids=ids, pixel_values=torch.randn(2, 3, 56, 56)))
    term.remove()
    monkeypatch.undo()
    narrow, _ = build_reference(size="cpu-tiny", image_size=56, seed=0)
    with pytest.raises(ValueError, match="a tally needs 30 channels of the head, which has 16"):
        GroundingLoss.for_supervision(narrow, tally, 1.0, -1, tally_weight=1.0)
