"""Vision-tower pretraining: dense patch labels from scene metadata, 2-D sin-cos positions in
the fresh testbed model, and stage 1 (`--vision-pretrain-steps`) of the training recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from eval.testbed import data
from eval.testbed.data import (
    BACKGROUND_RGB,
    CODE_DIGITS,
    CODE_LETTERS,
    COLOUR_RGB,
    COLOURS,
    DIGITS,
    GRID_LINE_RGB,
    INK_RGB,
    PATCH_SIZE,
    SHAPES,
    _draw_shape,
)
from eval.testbed.model import build_reference, sincos_position_embedding
from eval.testbed.patch_labels import (
    GROUNDING_LABELS,
    INK_THRESHOLD,
    LABEL_CLASSES,
    MAX_LIKE_COUNT,
    MIN_INK_PIXELS,
    NEIGHBOUR_LABELS,
    OPTIONAL_LABEL_CLASSES,
    label_sizes,
    patch_labels,
)

SIZE = 224
GRID = SIZE // PATCH_SIZE  # 16
P = PATCH_SIZE


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND_RGB)
    return image, ImageDraw.Draw(image)


def _grid(labels: dict[str, np.ndarray], name: str) -> np.ndarray:
    assert labels[name].shape == (GRID * GRID,)
    return labels[name].reshape(GRID, GRID)


def _expected(cells: dict[tuple[int, int], int]) -> np.ndarray:
    out = np.zeros((GRID, GRID), dtype=np.int64)
    for (row, col), value in cells.items():
        out[row, col] = value
    return out


def _ink_count(pixels: np.ndarray, row: int, col: int) -> int:
    patch = pixels[row * P : (row + 1) * P, col * P : (col + 1) * P].astype(np.int16)
    distance = np.abs(patch - np.array(BACKGROUND_RGB, dtype=np.int16)).max(axis=-1)
    return int((distance > INK_THRESHOLD).sum())


def _colour(name: str) -> int:
    return 1 + COLOURS.index(name)


def _shape(name: str) -> int:
    return LABEL_CLASSES["shape"].index(name)


# ----------------------------------------------------------------------------- patch labels


def test_patch_labels_hand_built_scene() -> None:
    image, draw = _canvas()
    # Red square exactly over patches rows 2-3, cols 4-5.
    red = (4 * P, 2 * P, 6 * P, 4 * P)
    # Green square exactly over rows 4-6, cols 10-12: its centre is inside patch (5, 11).
    green = (10 * P, 4 * P, 13 * P, 7 * P)
    # Blue square over rows/cols 8-9 fully and half of row/col 10 (7 px), with a yellow dot
    # (6 px, smaller than a patch) in the uncovered part of patch (10, 10).
    blue = (8 * P, 8 * P, 10 * P + 7, 10 * P + 7)
    dot = (10 * P + 8, 10 * P + 8, 10 * P + 14, 10 * P + 14)
    for colour, box in (("red", red), ("green", green), ("blue", blue)):
        _draw_shape(draw, "square", box, COLOUR_RGB[colour])
    _draw_shape(draw, "circle", dot, COLOUR_RGB["yellow"])
    # A thin grey grid line across row 14 and down column 15: not ink.
    draw.line((0, 14 * P + 5, SIZE - 1, 14 * P + 5), fill=GRID_LINE_RGB, width=1)
    draw.line((15 * P + 3, 0, 15 * P + 3, SIZE - 1), fill=GRID_LINE_RGB, width=1)
    pixels = np.asarray(image)
    meta = {
        "objects": [
            {"colour": "red", "shape": "square", "box": list(red)},
            {"colour": "green", "shape": "square", "box": list(green)},
            {"colour": "blue", "shape": "square", "box": list(blue)},
        ],
        "small_objects": [{"colour": "yellow", "shape": "circle", "box": list(dot)}],
    }
    # Metadata as the generator stores it (a JSON string) and as a dict give the same labels.
    labels = patch_labels(json.dumps(meta), pixels)
    as_dict = patch_labels(meta, pixels)
    assert (
        labels.keys()
        == as_dict.keys()
        == LABEL_CLASSES.keys() | OPTIONAL_LABEL_CLASSES.keys() | set(GROUNDING_LABELS)
    )
    for name in labels:
        assert np.array_equal(labels[name], as_dict[name])
        assert labels[name].dtype == np.int64

    red_cells = [(r, c) for r in (2, 3) for c in (4, 5)]
    green_cells = [(r, c) for r in (4, 5, 6) for c in (10, 11, 12)]
    blue_cells = [(r, c) for r in (8, 9, 10) for c in (8, 9, 10) if (r, c) != (10, 10)]
    colour = {cell: _colour("red") for cell in red_cells}
    colour |= {cell: _colour("green") for cell in green_cells}
    colour |= {cell: _colour("blue") for cell in blue_cells}
    colour[(10, 10)] = _colour("yellow")
    shape = dict.fromkeys(red_cells + green_cells + blue_cells, _shape("square"))
    shape[(10, 10)] = _shape("dot")
    assert np.array_equal(_grid(labels, "colour"), _expected(colour))
    assert np.array_equal(_grid(labels, "shape"), _expected(shape))
    # The grid-line rows/columns really are drawn but stay background.
    assert (pixels[14 * P + 5, :, :] == GRID_LINE_RGB).all()
    assert (_grid(labels, "colour")[14] == 0).all() and (_grid(labels, "colour")[:, 15] == 0).all()

    centre = _grid(labels, "centre")
    assert centre[5, 11] == 1  # green (3x3 patches): unambiguous centre patch
    assert centre[9, 9] == 1  # blue: centre (129.5, 129.5)
    assert centre[10, 10] == 1  # the dot
    red_centres = [cell for cell in red_cells if centre[cell] == 1]
    assert len(red_centres) == 1  # red's centre sits on a patch corner: exactly one of its 4
    assert int(centre.sum()) == 4

    assert (labels["digit"] == 0).all() and (labels["char"] == 0).all()
    assert np.array_equal(
        _grid(labels, "row"), np.repeat(np.arange(GRID), GRID).reshape(GRID, GRID)
    )
    assert np.array_equal(_grid(labels, "row")[7], np.full(GRID, 7))
    assert np.array_equal(_grid(labels, "column")[7], np.arange(GRID))
    assert label_sizes(GRID)["row"] == label_sizes(GRID)["column"] == GRID
    # Three squares of three colours: each is the only one of its kind; the dot counts nothing.
    assert np.array_equal(
        _grid(labels, "like_count"),
        _expected(dict.fromkeys(red_cells + green_cells + blue_cells, 1)),
    )
    assert label_sizes(GRID)["shape"] == len(SHAPES) + 2  # none, 4 shapes, dot


def test_patch_labels_ink_threshold_and_slivers() -> None:
    image, draw = _canvas()
    # A purple square 1 px into the patch row above it, over only 5 px: a sliver of ink.
    body = (2 * P, 5 * P, 4 * P, 7 * P)
    _draw_shape(draw, "square", body, COLOUR_RGB["purple"])
    draw.rectangle((2 * P + 3, 5 * P - 1, 2 * P + 7, 5 * P - 1), fill=COLOUR_RGB["purple"])
    box = (2 * P, 5 * P - 1, 4 * P, 7 * P)  # the meta box includes the sliver
    # An object whose box spans a patch that only its faint (grid-line grey) part reaches.
    _draw_shape(draw, "square", (8 * P, 8 * P, 9 * P, 9 * P), COLOUR_RGB["red"])
    draw.rectangle((9 * P, 8 * P, 10 * P - 1, 9 * P - 1), fill=GRID_LINE_RGB)
    # A 6 px dot 1 px into patch (12, 4), the rest in (12, 5): any dot ink marks a patch.
    dot = (5 * P - 1, 12 * P + 4, 5 * P + 5, 12 * P + 10)
    _draw_shape(draw, "square", dot, COLOUR_RGB["yellow"])
    pixels = np.asarray(image)
    assert 0 < _ink_count(pixels, 4, 2) < MIN_INK_PIXELS
    assert _ink_count(pixels, 8, 9) == 0 and (pixels[8 * P, 9 * P] == GRID_LINE_RGB).all()
    assert 0 < _ink_count(pixels, 12, 4) < MIN_INK_PIXELS
    meta = {
        "objects": [
            {"colour": "purple", "shape": "square", "box": list(box)},
            {"colour": "red", "shape": "square", "box": [8 * P, 8 * P, 10 * P, 9 * P]},
        ],
        "small_objects": [{"colour": "yellow", "shape": "square", "box": list(dot)}],
    }
    labels = patch_labels(meta, pixels)
    cells = {(r, c): _colour("purple") for r in (5, 6) for c in (2, 3)}
    cells[(8, 8)] = _colour("red")
    cells[(12, 4)] = cells[(12, 5)] = _colour("yellow")
    assert np.array_equal(_grid(labels, "colour"), _expected(cells))
    assert _grid(labels, "shape")[4, 2] == 0 and _grid(labels, "shape")[8, 9] == 0
    assert _grid(labels, "shape")[12, 4] == _grid(labels, "shape")[12, 5] == _shape("dot")
    assert _grid(labels, "centre")[12, 5] == 1 and _grid(labels, "centre")[12, 4] == 0

    # Where two boxes overlap, the patch goes to the object with more ink in it.
    image, draw = _canvas()
    _draw_shape(draw, "square", (0, 0, 2 * P, P), COLOUR_RGB["green"])  # patches (0,0), (0,1)
    _draw_shape(draw, "square", (P + 10, 0, 3 * P, P), COLOUR_RGB["blue"])  # 4 px into (0,1)
    meta = {
        "objects": [
            {"colour": "blue", "shape": "cross", "box": [P + 10, 0, 3 * P, P]},
            {"colour": "green", "shape": "circle", "box": [0, 0, 2 * P, P]},
        ]
    }
    labels = patch_labels(meta, np.asarray(image))
    assert labels["colour"][:3].tolist() == [_colour("green"), _colour("green"), _colour("blue")]
    assert labels["shape"][:3].tolist() == [_shape("circle"), _shape("circle"), _shape("cross")]


def test_patch_labels_text_boxes() -> None:
    image, draw = _canvas()
    # A printed "x" over patches (0, 0)-(0, 1), a "5" in (0, 3), a handwritten "7" in (6, 6).
    x_box, five_box, seven_box = (
        (0, 0, 2 * P, P),
        (3 * P, 0, 4 * P, P),
        (6 * P, 6 * P, 7 * P, 7 * P),
    )
    for box in (x_box, five_box, seven_box):
        draw.rectangle((box[0] + 2, box[1] + 2, box[2] - 3, box[3] - 3), fill=INK_RGB)
    meta = {
        "code": "x5",
        "code_chars": [{"char": "x", "box": list(x_box)}, {"char": "5", "box": list(five_box)}],
        "digits": [{"digit": "7", "row": 1, "column": 1, "box": list(seven_box)}],
        "band_height": 56,
    }
    labels = patch_labels(meta, np.asarray(image))
    chars = LABEL_CLASSES["char"]
    assert chars == ("none", *CODE_LETTERS, *CODE_DIGITS)
    expected_char = _expected({(0, 0): chars.index("x"), (0, 1): chars.index("x")})
    expected_char[0, 3] = chars.index("5")
    assert np.array_equal(_grid(labels, "char"), expected_char)
    assert np.array_equal(_grid(labels, "digit"), _expected({(6, 6): 1 + DIGITS.index("7")}))
    # The digit's grid cell (row 1, column 1 of the digit grid) marks exactly its patch.
    assert np.array_equal(_grid(labels, "cell_row"), _expected({(6, 6): 1}))
    assert np.array_equal(_grid(labels, "cell_column"), _expected({(6, 6): 1}))
    assert np.array_equal(_grid(labels, "digit_centre"), _expected({(6, 6): 1 + DIGITS.index("7")}))
    for name in ("colour", "shape", "centre"):
        assert (labels[name] == 0).all()


@pytest.mark.parametrize("shape", [(224, 112, 3), (220, 220, 3)])
def test_patch_labels_reject_bad_image_sizes(shape: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="multiple of 14"):
        patch_labels({"objects": []}, np.full(shape, 245, dtype=np.uint8))


def test_patch_labels_on_generated_scenes() -> None:
    records = data.generate_examples(14, seed=0)
    by_family: dict[str, dict] = {}
    for record in records:
        by_family.setdefault(record["family"], record)
    assert set(by_family) == set(data.FAMILIES)
    for family, record in by_family.items():
        pixels = np.asarray(record["image"].convert("RGB"))
        meta = json.loads(record["meta"])
        labels = patch_labels(record["meta"], pixels)
        colour = _grid(labels, "colour")
        for row, col in zip(*np.nonzero(colour), strict=True):
            # Every coloured patch has ink, and in fact pixels of exactly that colour.
            assert _ink_count(pixels, row, col) > 0, (family, row, col)
            patch = pixels[row * P : (row + 1) * P, col * P : (col + 1) * P]
            rgb = COLOUR_RGB[COLOURS[colour[row, col] - 1]]
            assert (patch == rgb).all(axis=-1).any(), (family, row, col)
        # Conversely, a patch full of an object's colour is labelled.
        for row in range(GRID):
            for col in range(GRID):
                patch = pixels[row * P : (row + 1) * P, col * P : (col + 1) * P]
                painted = sum(int((patch == rgb).all(axis=-1).sum()) for rgb in COLOUR_RGB.values())
                if painted >= P * P // 2:
                    assert colour[row, col] != 0, (family, row, col)
        is_text = meta.get("base_family", family) == "text"
        n_objects = len(meta.get("objects", [])) + len(meta.get("small_objects", []))
        if is_text:
            assert (labels["digit"] != 0).any() and (labels["char"] != 0).any(), family
            # one centre patch per handwritten digit, labelled with that digit
            centres = labels["digit_centre"]
            assert sorted(centres[centres > 0].tolist()) == sorted(
                1 + DIGITS.index(glyph["digit"]) for glyph in meta["digits"]
            )
            assert (labels["colour"] == 0).all() and (labels["centre"] == 0).all()
        else:
            assert n_objects >= 1
            assert 1 <= int(labels["centre"].sum()) <= n_objects, family
            assert (labels["colour"] != 0).any() and (labels["shape"] != 0).any(), family


@pytest.mark.parametrize("seed", range(4))
def test_like_count_labels_count_identical_shapes_and_digits(seed: int) -> None:
    """On every patch of a counting scene's shapes: how many shapes share its colour and shape
    (so the target's patches give the question's answer); on a digit grid's patches: how many
    cells show that digit."""
    import random
    from collections import Counter

    rng = random.Random(seed)
    answer = str(rng.randint(1, MAX_LIKE_COUNT))
    scene = data._scene_counting(rng, SIZE, answer, "count")
    pixels = np.asarray(scene.image.convert("RGB"))
    labels = patch_labels(scene.meta, pixels)
    objects = scene.meta["objects"]
    kinds = Counter((o["colour"], o["shape"]) for o in objects)
    like = labels["like_count"]
    expected = np.zeros_like(like)
    for colour, shape in kinds:
        same = (labels["colour"] == _colour(colour)) & (labels["shape"] == _shape(shape))
        expected[same] = kinds[colour, shape]
    assert np.array_equal(like, expected)
    assert int(answer) in like.tolist()  # the asked-about kind's patches carry the answer
    assert sorted(set(like[like > 0].tolist())) == sorted({n for n in kinds.values()})

    text = data._scene_text(rng, SIZE, "7", "count", "train")
    text_pixels = np.asarray(text.image.convert("RGB"))
    text_labels = patch_labels(text.meta, text_pixels)
    grid_digits = Counter(glyph["digit"] for glyph in text.meta["digits"])
    for digit, n in grid_digits.items():
        on_digit = text_labels["digit"] == 1 + DIGITS.index(digit)
        assert on_digit.any() and (text_labels["like_count"][on_digit] == n).all()
    assert (text_labels["like_count"][text_labels["digit"] == 0] == 0).all()


@pytest.mark.parametrize("seed", range(6))
def test_neighbour_labels_name_the_clearly_nearest_and_farthest_shape(seed: int) -> None:
    """Every patch of a shape carries the colour of the shape whose centre is clearly nearest /
    farthest from its own, so each nearest/farthest question's anchor patches hold its answer;
    without a clear (30 %) winner the label is "none"."""
    import math
    import random

    rng = random.Random(seed)
    kind = ("nearest", "farthest")[seed % 2]
    scene = data._scene_spatial(rng, SIZE, data.COLOURS[seed % len(data.COLOURS)], kind)
    labels = patch_labels(scene.meta, np.asarray(scene.image.convert("RGB")))
    objects = scene.meta["objects"]
    centres = [((o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2) for o in objects]
    asked = 0
    for index, obj in enumerate(objects):
        on_object = labels["colour"] == _colour(obj["colour"])  # colours are distinct here
        assert on_object.any()
        ranked = sorted(
            (math.dist(centres[index], c), j) for j, c in enumerate(centres) if j != index
        )
        nearest = ranked[0][1] if ranked[0][0] * 1.3 <= ranked[1][0] else None
        farthest = ranked[-1][1] if ranked[-1][0] >= 1.3 * ranked[-2][0] else None
        for name, found in zip(NEIGHBOUR_LABELS, (nearest, farthest), strict=True):
            want = 0 if found is None else _colour(objects[found]["colour"])
            assert (labels[name][on_object] == want).all(), (name, index)
        for question in scene.questions:
            if question.kind in ("nearest", "farthest") and f" {obj['colour']} " in question.text:
                name = f"{question.kind}_colour"
                assert set(labels[name][on_object].tolist()) == {_colour(question.answer)}
                asked += 1
    assert asked >= 1  # the scene's first question is one of them
    for name in NEIGHBOUR_LABELS:
        assert (labels[name][labels["colour"] == 0] == 0).all()  # background: none


def test_optional_patch_labels_follow_the_flags() -> None:
    from eval.testbed.training.train import build_parser, optional_patch_labels

    def labels(*flags: str) -> tuple[str, ...]:
        return optional_patch_labels(
            build_parser().parse_args(["--data", "d", "--output-dir", "o", *flags])
        )

    assert labels() == ()
    assert labels("--vision-count-label") == ("like_count",)
    assert labels("--vision-neighbour-label") == NEIGHBOUR_LABELS
    both = labels("--vision-count-label", "--vision-neighbour-label")
    assert both == ("like_count", *NEIGHBOUR_LABELS)
    assert set(both) <= OPTIONAL_LABEL_CLASSES.keys()
    assert label_sizes(GRID, NEIGHBOUR_LABELS)["nearest_colour"] == 1 + len(data.COLOURS)
    assert labels("--vision-tally-label") == ("tally",)
    assert label_sizes(GRID, ("tally",))["tally"] == 1 + len(data.COLOURS) * len(data.SHAPES) + 10


def test_label_sizes_optional_labels() -> None:
    assert "like_count" not in label_sizes(GRID)
    assert label_sizes(GRID, ("like_count",))["like_count"] == MAX_LIKE_COUNT + 1
    with pytest.raises(ValueError, match="unknown optional patch labels.*like_count"):
        label_sizes(GRID, ("kin",))


# ----------------------------------------------------------------------------- positions


def test_sincos_position_embedding() -> None:
    table = sincos_position_embedding(16, 32)
    assert table.shape == (1 + 16 * 16, 32)
    assert (table[0] == 0).all()
    patches = torch.nn.functional.normalize(table[1:], dim=-1).reshape(16, 16, 32)

    def cos(a: tuple[int, int], b: tuple[int, int]) -> float:
        return float((patches[a] * patches[b]).sum())

    for anchor in [(0, 0), (5, 7), (8, 8), (15, 3)]:
        r, c = anchor
        near = [(r + dr, c + dc) for dr, dc in [(0, 1), (1, 0), (0, -1), (-1, 0)]]
        near = [(a, b) for a, b in near if 0 <= a < 16 and 0 <= b < 16]
        far = [(a, b) for a in range(16) for b in range(16) if abs(a - r) + abs(b - c) >= 6]
        assert min(cos(anchor, n) for n in near) > max(cos(anchor, f) for f in far)
        assert cos(anchor, anchor) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_position_embedding(16, 30)


def test_fresh_model_uses_sincos_positions() -> None:
    model, _ = build_reference(size="cpu-tiny", seed=0)
    config = model.config.vision_config
    assert (config.image_size, config.patch_size) == (224, 14)
    weight = model.model.vision_tower.embeddings.position_embedding.weight
    assert weight.requires_grad  # still trainable
    expected = sincos_position_embedding(16, config.hidden_size)
    assert torch.equal(weight.detach(), expected)
    assert (weight[0] == 0).all()


# ----------------------------------------------------------------------------- stage 1


def _tower_tensors(model: object) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.vision_tower.state_dict().items()}


def _language_tensors(model: object) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "vision_tower" not in k}


def test_patch_label_model_gradients_stop_at_feature_layer() -> None:
    from eval.testbed.training.vision_pretrain import (
        PatchLabelCollator,
        PatchLabelDataset,
        PatchLabelModel,
        feature_layer_count,
    )

    torch.manual_seed(0)
    model, processor = build_reference(size="cpu-tiny", seed=0)
    records = data.generate_examples(3, seed=1)
    pixels = torch.stack(
        [torch.from_numpy(np.array(r["image"].convert("RGB"))).permute(2, 0, 1) for r in records]
    )
    assert pixels.dtype == torch.uint8
    metas = [r["meta"] for r in records]
    dataset = PatchLabelDataset(pixels, metas)
    assert len(dataset) == 3
    item = dataset[1]
    expected = patch_labels(metas[1], np.asarray(records[1]["image"].convert("RGB")))
    for name, values in expected.items():
        assert torch.equal(item["patch_" + name], torch.from_numpy(values))
    ip = processor.image_processor
    batch = PatchLabelCollator(list(ip.image_mean), list(ip.image_std), float(ip.rescale_factor))(
        [dataset[i] for i in range(3)]
    )
    reference = ip(images=[r["image"] for r in records], return_tensors="pt")["pixel_values"]
    assert torch.allclose(batch["pixel_values"], reference, atol=1e-5)

    wrapper = PatchLabelModel(model)
    assert wrapper.vision_tower is model.model.vision_tower  # shared, not copied
    assert feature_layer_count(model) == 1  # cpu-tiny: 2 layers, LLaVA reads layer -2
    loss = wrapper(**batch)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    vision = model.model.vision_tower
    first, last = vision.encoder.layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
    assert vision.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in last.parameters())
    assert all(p.grad is None for p in vision.post_layernorm.parameters())

    # The optional count label adds its own head and its own loss terms.
    counting = PatchLabelModel(model, ("like_count",))
    assert counting.heads.keys() == wrapper.heads.keys() | {"like_count"}
    assert counting.heads["like_count"].out_features == MAX_LIKE_COUNT + 1
    counting.heads.load_state_dict(wrapper.heads.state_dict(), strict=False)
    counting.norm.load_state_dict(wrapper.norm.state_dict())
    with torch.no_grad():
        assert counting(**batch)["loss"] > wrapper(**batch)["loss"]
    assert all(p.grad is not None for p in wrapper.heads.parameters())
    # Nothing outside the tower is touched.
    assert all(p.grad is None for n, p in model.named_parameters() if "vision_tower" not in n)

    with pytest.raises(ValueError, match="hf/ export"):
        PatchLabelDataset(pixels, [metas[0], None, metas[2]])


def test_train_cli_with_vision_pretraining(
    tmp_path: Path, train_testbed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    from eval.testbed.model import load_reference
    from eval.testbed.training.train import main as train_main
    from eval.testbed.training.vision_pretrain import VISION_WEIGHTS

    out = train_testbed
    run = tmp_path / "run"
    argv = ["--data", str(out), "--init-reference", "--model-size", "cpu-tiny"]
    argv += ["--output-dir", str(run), "--batch-size", "4", "--save-steps", "2", "--no-progress"]
    argv += ["--vision-pretrain-steps", "2", "--vision-pretrain-batch-size", "4", "--freeze-vision"]
    argv += ["--logging-steps", "1"]
    assert train_main([*argv, "--max-steps", "4"]) == 0
    first_output = capsys.readouterr().out
    assert "vision pretraining patch accuracy" in first_output
    assert "already done" not in first_output

    weights_file = run / "vision_pretrain" / VISION_WEIGHTS
    assert weights_file.is_file()
    stage1 = load_file(str(weights_file))
    fresh, _ = build_reference(size="cpu-tiny", seed=0)
    init_tower, init_language = _tower_tensors(fresh), _language_tensors(fresh)
    trained, _ = load_reference(run / "final")
    tower, language = _tower_tensors(trained), _language_tensors(trained)

    assert stage1.keys() == tower.keys() == init_tower.keys()
    # --freeze-vision: the language stage left stage 1's tower bit for bit as it was.
    assert all(torch.equal(tower[k], stage1[k]) for k in tower)
    # Stage 1 trained the tower up to the feature layer, and nothing after it (no gradient).
    changed = {k for k in tower if not torch.equal(tower[k], init_tower[k])}
    assert "embeddings.patch_embedding.weight" in changed
    assert any(k.startswith("encoder.layers.0.") for k in changed)
    assert not any(k.startswith(("encoder.layers.1.", "post_layernorm.")) for k in changed)
    # Stage 2 trained the projector and the language model.
    assert language.keys() == init_language.keys()
    changed_language = {k for k in language if not torch.equal(language[k], init_language[k])}
    assert any("multi_modal_projector" in k for k in changed_language)
    assert any("language_model" in k for k in changed_language)

    # "Killed" after the step-2 checkpoint: --resume skips stage 1 and ends where the
    # uninterrupted run did. (transformers' Trainer alone reloads none of LLaVA's renamed
    # checkpoint keys and would go on from the initial weights.)
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "final")
    mtime = weights_file.stat().st_mtime_ns
    assert train_main([*argv, "--max-steps", "4", "--resume"]) == 0
    assert "vision pretraining already done" in capsys.readouterr().out
    assert weights_file.stat().st_mtime_ns == mtime
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 4
    resumed, _ = load_reference(run / "final")
    assert all(torch.equal(v, stage1[k]) for k, v in _tower_tensors(resumed).items())
    resumed_language = _language_tensors(resumed)
    for key, value in language.items():
        torch.testing.assert_close(resumed_language[key], value, atol=1e-5, rtol=0)
    history = json.loads((run / "loss.json").read_text())["history"]
    assert [row["step"] for row in history if "loss" in row] == [1, 2, 3, 4]


def test_train_cli_bf16_autocasts_both_stages_and_keeps_fp32_weights(tmp_path: Path) -> None:
    """--bf16 changes the arithmetic (the trained weights differ from an fp32 run's by bf16
    rounding) but not what is stored: both stages' weights stay fp32 and close to fp32's."""
    from eval.testbed.model import load_reference
    from eval.testbed.training.train import main as train_main

    out = data.export(
        data.make_dataset_dict(train=6, validation=0, test=0, seed=4, train_questions_per_image=2),
        tmp_path / "data",
    )
    trained = {}
    for precision in ("fp32", "bf16"):
        argv = ["--data", str(out), "--init-reference", "--model-size", "cpu-tiny"]
        argv += ["--output-dir", str(tmp_path / precision), "--batch-size", "3", "--no-progress"]
        argv += ["--vision-pretrain-steps", "2", "--vision-pretrain-batch-size", "3"]
        argv += ["--max-steps", "2", "--lr", "1e-3"]
        assert train_main(argv + (["--bf16"] if precision == "bf16" else [])) == 0
        model, _ = load_reference(tmp_path / precision / "final")
        trained[precision] = dict(model.named_parameters())
    for name, weight in trained["bf16"].items():
        assert weight.dtype == torch.float32, name
        assert torch.allclose(weight, trained["fp32"][name], atol=5e-2), name
    tower = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    language = "model.language_model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(trained["bf16"][tower], trained["fp32"][tower])  # stage 1 autocast
    assert not torch.equal(trained["bf16"][language], trained["fp32"][language])  # stage 2 too
