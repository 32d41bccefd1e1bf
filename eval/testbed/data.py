"""Procedural, offline VQA testbed for measuring what visual-token merging costs.

Every image is drawn with Pillow from a seed, so the data needs no download and the same seed
always yields the same bytes. Seven question families isolate abilities that token merging can
hurt differently: large-object attributes (the control), counting, spatial relations, objects
smaller than one 14x14 patch, reading handwritten digits and printed codes, POPE-style existence
with adversarial negatives, and multiple-choice versions of the above.

Answers are single lower-case words from a small closed vocabulary so that a word-level tokenizer
covers them and exact match is a fair metric. Within each family the answer of every image's
first question is drawn from a balanced cycle, so a constant guess scores chance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mllm_crossget.config import atomic_write_text, replace_folder

# ----------------------------------------------------------------------------- vocabulary

FAMILIES: tuple[str, ...] = (
    "attribute",
    "counting",
    "spatial",
    "small",
    "text",
    "existence",
    "multiple_choice",
)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Real product photos (Fashion-MNIST), opt-in: not in FAMILIES, so the seven procedural
# families, their rotation and the reference model's vocabulary stay exactly as they were.
FASHION = "fashion"
ALL_FAMILIES: tuple[str, ...] = (*FAMILIES, FASHION)

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 0),
    "purple": (140, 40, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
}
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
COUNTS: tuple[str, ...] = DIGITS
GRID_COUNTS: tuple[str, ...] = ("0", "1", "2", "3", "4")
CODE_LETTERS: tuple[str, ...] = ("k", "m", "x")
CODE_DIGITS: tuple[str, ...] = ("3", "5", "8")
CODES: tuple[str, ...] = tuple(letter + digit for letter in CODE_LETTERS for digit in CODE_DIGITS)
YES_NO: tuple[str, ...] = ("yes", "no")
# Fashion-MNIST's ten labels, in label order, as one lower-case word each.
FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)
FASHION_PLURALS: dict[str, str] = {
    name: name + ("es" if name.endswith("s") else "s") for name in FASHION_CLASSES
}
FASHION_COUNTS: tuple[str, ...] = ("0", "1", "2", "3", "4")
FASHION_GRID = 3  # photos per row and per column
LETTERS: tuple[str, ...] = ("a", "b", "c", "d")

# Answer set of every (family, kind); a guesser that knows the kind picks uniformly from it.
KIND_ANSWERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("attribute", "colour"): COLOURS,
    ("attribute", "shape"): SHAPES,
    ("counting", "count"): COUNTS,
    ("spatial", "relation"): RELATIONS,
    ("spatial", "nearest"): COLOURS,
    ("spatial", "farthest"): COLOURS,
    ("small", "exists"): YES_NO,
    ("small", "colour"): COLOURS,
    ("text", "cell"): DIGITS,
    ("text", "count"): GRID_COUNTS,
    ("text", "code"): CODES,
    ("existence", "exists"): YES_NO,
    (FASHION, "cell"): FASHION_CLASSES,
    (FASHION, "count"): FASHION_COUNTS,
    (FASHION, "exists"): YES_NO,
}
# Multiple-choice questions wrap these base kinds (each has at least four possible answers).
MC_BASE_KINDS: tuple[str, ...] = (
    "attribute:colour",
    "attribute:shape",
    "counting:count",
    "spatial:relation",
    "small:colour",
    "text:cell",
)
for _base in MC_BASE_KINDS:
    KIND_ANSWERS[("multiple_choice", _base)] = LETTERS

FAMILY_ANSWERS: dict[str, tuple[str, ...]] = {
    "attribute": COLOURS + SHAPES,
    "counting": COUNTS,
    "spatial": RELATIONS + COLOURS,
    "small": YES_NO + COLOURS,
    "text": DIGITS + CODES,
    "existence": YES_NO,
    "multiple_choice": LETTERS,
    FASHION: FASHION_CLASSES + FASHION_COUNTS + YES_NO,
}

PATCH_SIZE = 14
SMALL_OBJECT_MIN_PX = 6
SMALL_OBJECT_MAX_PX = 10  # strictly below PATCH_SIZE, whatever the image size
BACKGROUND_RGB = (245, 245, 245)
INK_RGB = (20, 20, 20)
GRID_LINE_RGB = (200, 200, 200)
DEFAULT_IMAGE_SIZE = 224
DIGIT_POOLS: tuple[str, ...] = ("train", "heldout", "all")

# Seeds of the three splits are offset so that one base seed gives disjoint streams.
SPLIT_SEED_OFFSETS: dict[str, int] = {"train": 0, "validation": 1_000_003, "test": 2_000_029}

QUESTION_TEMPLATES: dict[tuple[str, str], str] = {
    ("attribute", "colour"): "what color is the {shape}?",
    ("attribute", "shape"): "what shape is the {colour} object?",
    ("counting", "count"): "how many {colour} {plural} are there?",
    ("spatial", "relation"): "where is the {colour} {shape} relative to the {colour2} {shape2}?",
    ("spatial", "nearest"): "what color is the object nearest to the {colour} {shape}?",
    ("spatial", "farthest"): "what color is the object farthest from the {colour} {shape}?",
    ("small", "exists"): "is there a small {colour} dot?",
    ("small", "colour"): "what color is the small dot?",
    ("text", "cell"): "what digit is in row {row} column {column}?",
    ("text", "count"): "how many cells show the digit {digit}?",
    ("text", "code"): "what is the code?",
    ("existence", "exists"): "is there a {colour} {shape}?",
    (FASHION, "cell"): "what is in row {row} column {column}?",
    (FASHION, "count"): "how many {plural} are there?",
    (FASHION, "exists"): "is there a {item}?",
}
MC_SUFFIX = " (a) {0} (b) {1} (c) {2} (d) {3}"


def kinds_for_answer(family: str, answer: str) -> tuple[str, ...]:
    """Kinds of question that can ask for `answer`; the generator picks one uniformly.

    Shared by the generator and by `CHANCE`, so the chance table always matches the data.
    """
    if family == "multiple_choice":
        return MC_BASE_KINDS
    kinds = tuple(
        k for (f, k), answers in KIND_ANSWERS.items() if f == family and answer in answers
    )
    if not kinds:
        raise ValueError(f"answer {answer!r} is not possible in family {family!r}")
    return kinds


def _family_chance(family: str) -> float:
    answers = FAMILY_ANSWERS[family]
    total = 0.0
    for answer in answers:
        kinds = kinds_for_answer(family, answer)
        total += sum(1.0 / len(KIND_ANSWERS[(family, k)]) for k in kinds) / len(kinds)
    return total / len(answers)


# Accuracy of a guesser that knows the question kind and picks uniformly among that kind's
# answers, under the balanced answer distribution of single-question images. Stricter than
# 1/len(FAMILY_ANSWERS[family]) because e.g. a colour question never has a shape answer.
CHANCE: dict[str, float] = {family: _family_chance(family) for family in ALL_FAMILIES}


def chance_by_family(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Kind-aware chance accuracy of exactly these records (matches `CHANCE` on balanced data)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for record in records:
        family = record["family"]
        sums[family] = sums.get(family, 0.0) + 1.0 / len(KIND_ANSWERS[(family, record["kind"])])
        counts[family] = counts.get(family, 0) + 1
    return {family: sums[family] / counts[family] for family in sums}


def vocabulary_words() -> list[str]:
    """Every word a question, prompt or answer of the seven procedural families can contain,
    for the reference model's word-level tokenizer (the fashion family is for sub-word
    tokenizers and stays out, so the reference vocabulary is unchanged)."""
    words: set[str] = set()
    for (family, _), template in QUESTION_TEMPLATES.items():
        if family in FAMILIES:
            words.update(_split_words(template))
    words.update(_split_words(MC_SUFFIX))
    for (family, _), answers in KIND_ANSWERS.items():
        if family in FAMILIES:
            words.update(answers)
    for family, answers in FAMILY_ANSWERS.items():
        if family in FAMILIES:
            words.update(answers)
    words.update(COLOURS + SHAPES + tuple(SHAPE_PLURALS.values()) + DIGITS)
    words.update(("user", "assistant", ":", "\n"))
    words.discard("\n")
    return sorted(w for w in words if not (w.startswith("{") or w.endswith("}")))


def _split_words(text: str) -> list[str]:
    """Splits like the tokenizer: on whitespace, with each punctuation character on its own."""
    words: list[str] = []
    for chunk in text.replace("{", " {").replace("}", "} ").split():
        if chunk.startswith("{") and chunk.endswith("}"):
            continue
        current = ""
        for char in chunk:
            if char.isalnum() or char == "_":
                current += char
            else:
                if current:
                    words.append(current.lower())
                    current = ""
                words.append(char)
        if current:
            words.append(current.lower())
    return words


# ----------------------------------------------------------------------------- scenes


@dataclass
class Question:
    text: str
    answer: str
    kind: str
    choices: list[str] = field(default_factory=list)


@dataclass
class Scene:
    image: Image.Image
    questions: list[Question]  # questions[0] carries the balanced answer
    meta: dict[str, Any]


Box = tuple[int, int, int, int]


class _PlacementError(RuntimeError):
    """A random layout did not fit; the caller retries with fresh randomness."""


def _scale(image_size: int, pixels: float) -> int:
    return max(1, round(pixels * image_size / DEFAULT_IMAGE_SIZE))


def _boxes_overlap(a: Box, b: Box, margin: int) -> bool:
    return not (
        a[2] + margin <= b[0]
        or b[2] + margin <= a[0]
        or a[3] + margin <= b[1]
        or b[3] + margin <= a[1]
    )


def _place_box(
    rng: random.Random, size: int, canvas: Box, taken: Sequence[Box], margin: int, tries: int = 200
) -> Box:
    """Rejection-samples a size x size box inside `canvas` clear of `taken` by `margin` px."""
    x_lo, y_lo, x_hi, y_hi = canvas
    for _ in range(tries):
        x0 = rng.randint(x_lo, x_hi - size)
        y0 = rng.randint(y_lo, y_hi - size)
        box = (x0, y0, x0 + size, y0 + size)
        if all(not _boxes_overlap(box, other, margin) for other in taken):
            return box
    raise _PlacementError("no free position")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, rgb: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    x1, y1 = x1 - 1, y1 - 1  # Pillow boxes are inclusive
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "cross":
        third = (x1 - x0) / 3
        draw.rectangle((x0 + third, y0, x1 - third, y1), fill=rgb)
        draw.rectangle((x0, y0 + third, x1, y1 - third), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _centre(box: Box) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def _relation(a: Box, b: Box, min_offset: float) -> str | None:
    """Where `a` is relative to `b`, or None when the dominant axis is not clear."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    dx, dy = ax - bx, ay - by
    if abs(dx) >= 2 * abs(dy) and abs(dx) >= min_offset:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx) and abs(dy) >= min_offset:
        return "above" if dy < 0 else "below"
    return None


def _new_canvas(image_size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND_RGB)
    return image, ImageDraw.Draw(image)


def _objects_meta(objects: Sequence[tuple[str, str, Box]]) -> list[dict[str, Any]]:
    return [{"colour": c, "shape": s, "box": list(b)} for c, s, b in objects]


def _unique_questions(
    primary: Question, pool: Sequence[Question], rng: random.Random
) -> list[Question]:
    """Primary question first, then the other pool questions in random order, no repeats."""
    seen = {primary.text}
    rest = []
    for question in pool:
        if question.text not in seen:
            seen.add(question.text)
            rest.append(question)
    rng.shuffle(rest)
    return [primary, *rest]


def _scene_attribute(rng: random.Random, size: int, answer: str, kind: str) -> Scene:
    """Two or three large objects with distinct colours and shapes; ask a colour or a shape."""
    n_objects = rng.randint(2, 3)
    shapes = rng.sample(SHAPES, n_objects)
    colours = rng.sample(COLOURS, n_objects)
    target = 0
    if kind == "colour":
        colours = [answer, *rng.sample([c for c in COLOURS if c != answer], n_objects - 1)]
    else:
        shapes = [answer, *rng.sample([s for s in SHAPES if s != answer], n_objects - 1)]
    image, draw = _new_canvas(size)
    boxes: list[Box] = []
    for _ in range(n_objects):
        side = _scale(size, rng.randint(56, 76))
        boxes.append(_place_box(rng, side, (4, 4, size - 4, size - 4), boxes, _scale(size, 8)))
    objects = list(zip(colours, shapes, boxes, strict=True))
    for colour, shape, box in objects:
        _draw_shape(draw, shape, box, COLOUR_RGB[colour])

    def ask(index: int, question_kind: str) -> Question:
        colour, shape, _ = objects[index]
        if question_kind == "colour":
            text = QUESTION_TEMPLATES[("attribute", "colour")].format(shape=shape)
            return Question(text, colour, "colour")
        text = QUESTION_TEMPLATES[("attribute", "shape")].format(colour=colour)
        return Question(text, shape, "shape")

    pool = [ask(i, k) for i in range(n_objects) for k in ("colour", "shape")]
    return Scene(
        image, _unique_questions(ask(target, kind), pool, rng), {"objects": _objects_meta(objects)}
    )


def counting_cell_centres(size: int) -> list[int]:
    """Centres of the counting grid's columns (and rows), each the centre of a 14-px patch.

    The grid's pitch is an eighth of the image. At 336 px that is three patches, so its middle
    patch's centre is the cell's centre and the grid has 8 cells a side; at 224 px it is two,
    so the centres move half a patch off the cells' corners and the grid has 7 a side.
    """
    pitch = size // 8
    if (pitch // PATCH_SIZE) % 2 == 1:
        return [pitch * k + pitch // 2 for k in range(8)]
    return [pitch * k + pitch // 2 + PATCH_SIZE // 2 for k in range(7)]


def _scene_counting(rng: random.Random, size: int, answer: str, kind: str) -> Scene:
    """Identical target objects among look-alikes that share either their colour or their shape.

    Objects sit in a grid of cells with a little jitter, so they never touch and each one is a
    separate blob to count. Every centre lies inside one 14-px patch, at least 4.5 px from its
    edges: at 224 px a cell is two patches wide, so a centred object would sit on a corner of
    four patches and a model that counts one patch per object would have to break a tie.
    """
    colour, other_colour = rng.sample(COLOURS, 2)
    shape, other_shape = rng.sample(SHAPES, 2)
    types = [(colour, shape), (colour, other_shape), (other_colour, shape)]
    counts = [int(answer), rng.randint(0, 9), rng.randint(0, 9)]
    centres = counting_cell_centres(size)
    per_row = len(centres)
    cells = rng.sample(range(per_row * per_row), sum(counts))
    jitter = 2  # pixels at any size: the centre stays 4.5 px inside its patch
    image, draw = _new_canvas(size)
    objects: list[tuple[str, str, Box]] = []
    cursor = 0
    for (obj_colour, obj_shape), count in zip(types, counts, strict=True):
        for cell_index in cells[cursor : cursor + count]:
            side = _scale(size, rng.randint(18, 22))
            centre_x = centres[cell_index % per_row] + rng.randint(-jitter, jitter)
            centre_y = centres[cell_index // per_row] + rng.randint(-jitter, jitter)
            x0, y0 = centre_x - side // 2, centre_y - side // 2
            box = (x0, y0, x0 + side, y0 + side)
            _draw_shape(draw, obj_shape, box, COLOUR_RGB[obj_colour])
            objects.append((obj_colour, obj_shape, box))
        cursor += count

    def ask(obj_colour: str, obj_shape: str, count: int) -> Question:
        text = QUESTION_TEMPLATES[("counting", "count")].format(
            colour=obj_colour, plural=SHAPE_PLURALS[obj_shape]
        )
        return Question(text, str(count), "count")

    pool = [ask(c, s, n) for (c, s), n in zip(types, counts, strict=True)]
    return Scene(image, _unique_questions(pool[0], pool, rng), {"objects": _objects_meta(objects)})


def _scene_spatial(rng: random.Random, size: int, answer: str, kind: str) -> Scene:
    """Objects of distinct colours; ask a pairwise relation or the nearest/farthest object."""
    n_objects = rng.randint(2, 3) if kind == "relation" else rng.randint(3, 4)
    colours = rng.sample(COLOURS, n_objects)
    shapes = [rng.choice(SHAPES) for _ in range(n_objects)]
    min_offset = _scale(size, 40)
    canvas = (4, 4, size - 4, size - 4)
    margin = _scale(size, 6)
    boxes: list[Box] = []
    primary: Question
    if kind == "relation":
        side_b = _scale(size, rng.randint(34, 46))
        side_a = _scale(size, rng.randint(34, 46))
        for _ in range(200):
            box_b = _place_box(rng, side_b, canvas, [], margin)
            distance = rng.uniform(1.2 * min_offset, 0.6 * size)
            across = rng.uniform(-0.3, 0.3) * distance
            dx, dy = {
                "left": (-distance, across),
                "right": (distance, across),
                "above": (across, -distance),
                "below": (across, distance),
            }[answer]
            cx, cy = _centre(box_b)
            x0, y0 = round(cx + dx - side_a / 2), round(cy + dy - side_a / 2)
            box_a = (x0, y0, x0 + side_a, y0 + side_a)
            inside = (
                x0 >= canvas[0]
                and y0 >= canvas[1]
                and box_a[2] <= canvas[2]
                and box_a[3] <= canvas[3]
            )
            if (
                inside
                and not _boxes_overlap(box_a, box_b, margin)
                and _relation(box_a, box_b, min_offset) == answer
            ):
                break
        else:
            raise _PlacementError("relation layout")
        boxes = [box_a, box_b]
        for _ in range(n_objects - 2):
            boxes.append(_place_box(rng, _scale(size, rng.randint(34, 46)), canvas, boxes, margin))
        primary = Question(
            QUESTION_TEMPLATES[("spatial", "relation")].format(
                colour=colours[0], shape=shapes[0], colour2=colours[1], shape2=shapes[1]
            ),
            answer,
            "relation",
        )
    else:
        for _ in range(200):
            boxes = []
            for _ in range(n_objects):
                boxes.append(
                    _place_box(rng, _scale(size, rng.randint(34, 46)), canvas, boxes, margin)
                )
            target = extreme_neighbour(boxes, 0, kind)
            if target is not None:
                break
        else:
            raise _PlacementError("nearest/farthest layout")
        # Recolour so the nearest/farthest object carries the balanced answer colour.
        others = rng.sample([c for c in COLOURS if c != answer], n_objects - 1)
        colours = others[:target] + [answer] + others[target:]
        primary = Question(
            QUESTION_TEMPLATES[("spatial", kind)].format(colour=colours[0], shape=shapes[0]),
            answer,
            kind,
        )
    image, draw = _new_canvas(size)
    objects = list(zip(colours, shapes, boxes, strict=True))
    for colour, shape, box in objects:
        _draw_shape(draw, shape, box, COLOUR_RGB[colour])

    pool: list[Question] = []
    for i, (colour_a, shape_a, box_a) in enumerate(objects):
        for j, (colour_b, shape_b, box_b) in enumerate(objects):
            relation = _relation(box_a, box_b, min_offset) if i != j else None
            if relation is not None:
                text = QUESTION_TEMPLATES[("spatial", "relation")].format(
                    colour=colour_a, shape=shape_a, colour2=colour_b, shape2=shape_b
                )
                pool.append(Question(text, relation, "relation"))
        if len(objects) >= 3:
            for extreme in ("nearest", "farthest"):
                found = extreme_neighbour(boxes, i, extreme)
                if found is not None:
                    text = QUESTION_TEMPLATES[("spatial", extreme)].format(
                        colour=colour_a, shape=shape_a
                    )
                    pool.append(Question(text, objects[found][0], extreme))
    return Scene(image, _unique_questions(primary, pool, rng), {"objects": _objects_meta(objects)})


def extreme_neighbour(boxes: Sequence[Box], anchor: int, kind: str) -> int | None:
    """Index of the clearly nearest/farthest box from `anchor` (30% margin), else None."""
    ax, ay = _centre(boxes[anchor])
    distances = sorted(
        (math.dist((ax, ay), _centre(box)), index)
        for index, box in enumerate(boxes)
        if index != anchor
    )
    if len(distances) < 2:
        return None
    if kind == "nearest" and distances[0][0] * 1.3 <= distances[1][0]:
        return distances[0][1]
    if kind == "farthest" and distances[-1][0] >= 1.3 * distances[-2][0]:
        return distances[-1][1]
    return None


def _scene_small(rng: random.Random, size: int, answer: str, kind: str) -> Scene:
    """Large distractors plus at most one dot smaller than a patch; ask whether it is there or
    what colour it has. Negatives name a colour that a large object has, so colour alone is not
    enough: the model must see the dot itself."""
    image, draw = _new_canvas(size)
    canvas = (4, 4, size - 4, size - 4)
    large: list[tuple[str, str, Box]] = []
    for _ in range(rng.randint(1, 3)):
        side = _scale(size, rng.randint(40, 64))
        box = _place_box(rng, side, canvas, [b for _, _, b in large], _scale(size, 6))
        large.append((rng.choice(COLOURS), rng.choice(SHAPES), box))
    large_colours = sorted({c for c, _, _ in large})

    if kind == "colour":
        dot_colour: str | None = answer
    elif answer == "yes":
        dot_colour = rng.choice(COLOURS)
    else:
        dot_colour = rng.choice(COLOURS) if rng.random() < 0.5 else None

    small: list[dict[str, Any]] = []
    if dot_colour is not None:
        side = rng.randint(SMALL_OBJECT_MIN_PX, SMALL_OBJECT_MAX_PX)
        box = _place_box(rng, side, canvas, [b for _, _, b in large], 10)
        dot_shape = rng.choice(("circle", "square"))
        small.append({"colour": dot_colour, "shape": dot_shape, "box": list(box)})
    for colour, shape, box in large:
        _draw_shape(draw, shape, box, COLOUR_RGB[colour])
    for dot in small:
        _draw_shape(draw, dot["shape"], tuple(dot["box"]), COLOUR_RGB[dot["colour"]])

    def absent_colour() -> str:
        # Prefer a colour that a large object has: the POPE-style adversarial negative.
        options = [c for c in large_colours if c != dot_colour] or [
            c for c in COLOURS if c != dot_colour
        ]
        return rng.choice(options)

    def exists(colour: str) -> Question:
        text = QUESTION_TEMPLATES[("small", "exists")].format(colour=colour)
        return Question(text, "yes" if colour == dot_colour else "no", "exists")

    colour_question = Question(QUESTION_TEMPLATES[("small", "colour")], str(dot_colour), "colour")
    if kind == "colour":
        primary = colour_question
    elif answer == "yes":
        primary = exists(str(dot_colour))
    else:
        primary = exists(absent_colour())
    pool = [exists(absent_colour()), exists(absent_colour())]
    if dot_colour is not None:
        pool += [colour_question, exists(dot_colour)]
    meta = {"objects": _objects_meta(large), "small_objects": small}
    return Scene(image, _unique_questions(primary, pool, rng), meta)


@cache
def _digit_bank(pool: str) -> dict[int, np.ndarray]:
    """Handwritten 8x8 digits from scikit-learn (shipped in the wheel, no download), by label.

    Every fifth sample is held out so that validation/test digits are never seen in training.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = np.arange(len(digits.target))
    keep = {"train": index % 5 != 0, "heldout": index % 5 == 0, "all": index >= 0}[pool]
    images, labels = digits.images[keep], digits.target[keep]
    return {label: images[labels == label] for label in range(10)}


def _draw_digit(image: Image.Image, glyph: np.ndarray, box: Box) -> None:
    side = box[2] - box[0]
    ink = Image.fromarray(np.uint8(np.clip(glyph / 16.0, 0, 1) * 255), mode="L")
    ink = ink.resize((side, side), Image.Resampling.BILINEAR)
    image.paste(Image.new("RGB", (side, side), INK_RGB), box[:2], ink)


@cache
def _font(pixels: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=pixels)


def _scene_text(rng: random.Random, size: int, answer: str, kind: str, digit_pool: str) -> Scene:
    """A printed code on top and a 3x3 grid of handwritten digits below it."""
    bank = _digit_bank(digit_pool)
    band = _scale(size, 56)
    cell_h = (size - band) / 3
    cell_w = size / 3
    code = answer if kind == "code" else rng.choice(CODES)
    if kind == "count":
        query = rng.choice(DIGITS)
        hits = set(rng.sample(range(9), int(answer)))
        grid = [
            query if i in hits else rng.choice([d for d in DIGITS if d != query]) for i in range(9)
        ]
    else:
        grid = [rng.choice(DIGITS) for _ in range(9)]
    target_cell = rng.randrange(9)
    if kind == "cell":
        grid[target_cell] = answer
    image, draw = _new_canvas(size)
    font = _font(_scale(size, 36))
    left, top, right, bottom = draw.textbbox((0, 0), code, font=font)
    text_w, text_h = right - left, bottom - top
    tx = rng.randint(_scale(size, 8), size - text_w - _scale(size, 8)) - left
    ty = (band - text_h) // 2 + rng.randint(-_scale(size, 4), _scale(size, 4)) - top
    draw.text((tx, ty), code, fill=INK_RGB, font=font)
    # Where each printed character landed, for dense patch labels (eval/testbed/patch_labels.py).
    code_chars = []
    for position, char in enumerate(code):
        before = draw.textlength(code[:position], font=font)
        x0, y0, x1, y1 = draw.textbbox((tx + before, ty), char, font=font)
        code_chars.append({"char": char, "box": [int(x0), int(y0), int(x1), int(y1)]})
    for k in range(4):
        y = round(band + k * cell_h) - (1 if k == 3 else 0)
        draw.line((0, y, size - 1, y), fill=GRID_LINE_RGB, width=1)
        x = round(k * cell_w) - (1 if k == 3 else 0)
        draw.line((x, band, x, size - 1), fill=GRID_LINE_RGB, width=1)
    glyph_side = _scale(size, 44)
    digit_meta = []
    for index, digit in enumerate(grid):
        row, column = divmod(index, 3)
        slack_x = int(cell_w) - glyph_side - 2
        slack_y = int(cell_h) - glyph_side - 2
        x0 = round(column * cell_w) + 1 + rng.randint(0, max(0, slack_x))
        y0 = round(band + row * cell_h) + 1 + rng.randint(0, max(0, slack_y))
        candidates = bank[int(digit)]
        glyph = candidates[rng.randrange(len(candidates))]
        box = (x0, y0, x0 + glyph_side, y0 + glyph_side)
        _draw_digit(image, glyph, box)
        digit_meta.append({"digit": digit, "row": row + 1, "column": column + 1, "box": list(box)})

    def cell_question(index: int) -> Question:
        row, column = divmod(index, 3)
        text = QUESTION_TEMPLATES[("text", "cell")].format(row=row + 1, column=column + 1)
        return Question(text, grid[index], "cell")

    def count_question(digit: str) -> Question:
        text = QUESTION_TEMPLATES[("text", "count")].format(digit=digit)
        return Question(text, str(grid.count(digit)), "count")

    code_question = Question(QUESTION_TEMPLATES[("text", "code")], code, "code")
    if kind == "code":
        primary = code_question
    elif kind == "count":
        primary = count_question(query)
    else:
        primary = cell_question(target_cell)
    pool = [code_question, *(cell_question(i) for i in range(9))]
    # One count question for the most frequent digit and one for an absent digit: asking about
    # every present digit would make "1" dominate the training answers.
    most = max(grid.count(d) for d in DIGITS)
    pool.append(count_question(rng.choice([d for d in DIGITS if grid.count(d) == most])))
    absent = [d for d in DIGITS if d not in grid]
    if absent:
        pool.append(count_question(rng.choice(absent)))
    meta = {"code": code, "code_chars": code_chars, "digits": digit_meta, "band_height": band}
    return Scene(image, _unique_questions(primary, pool, rng), meta)


def _scene_existence(rng: random.Random, size: int, answer: str, kind: str) -> Scene:
    """POPE-style yes/no: negatives reuse a colour and a shape that are in the image, just
    never together, so answering needs the binding of colour to shape."""
    n_objects = rng.randint(3, 5)
    combos: list[tuple[str, str]] = []
    while len(combos) < n_objects:
        combo = (rng.choice(COLOURS), rng.choice(SHAPES))
        if combo not in combos:
            combos.append(combo)
    canvas = (4, 4, size - 4, size - 4)
    boxes: list[Box] = []
    for _ in combos:
        boxes.append(
            _place_box(rng, _scale(size, rng.randint(36, 52)), canvas, boxes, _scale(size, 6))
        )
    image, draw = _new_canvas(size)
    objects = [(c, s, b) for (c, s), b in zip(combos, boxes, strict=True)]
    for colour, shape, box in objects:
        _draw_shape(draw, shape, box, COLOUR_RGB[colour])

    present_colours = {c for c, _ in combos}
    present_shapes = {s for _, s in combos}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in combos]
    adversarial = [(c, s) for c, s in absent if c in present_colours and s in present_shapes]
    same_shape = [(c, s) for c, s in absent if s in present_shapes]
    negatives = adversarial or same_shape or absent

    def ask(colour: str, shape: str, truth: str) -> Question:
        text = QUESTION_TEMPLATES[("existence", "exists")].format(colour=colour, shape=shape)
        return Question(text, truth, "exists")

    if answer == "yes":
        primary = ask(*rng.choice(combos), "yes")
    else:
        primary = ask(*rng.choice(negatives), "no")
    pool = [ask(c, s, "yes") for c, s in combos]
    pool += [ask(c, s, "no") for c, s in rng.sample(negatives, min(len(negatives), n_objects))]
    return Scene(image, _unique_questions(primary, pool, rng), {"objects": _objects_meta(objects)})


SceneMaker = Callable[[random.Random, int, str, str], Scene]


def _scene_for(family: str, digit_pool: str) -> SceneMaker:
    makers: dict[str, SceneMaker] = {
        "attribute": _scene_attribute,
        "counting": _scene_counting,
        "spatial": _scene_spatial,
        "small": _scene_small,
        "existence": _scene_existence,
        "text": lambda rng, size, answer, kind: _scene_text(rng, size, answer, kind, digit_pool),
    }
    return makers[family]


def _as_multiple_choice(
    question: Question, base_kind: str, letter: str, rng: random.Random
) -> Question:
    """Lists the right answer at `letter` among three wrong answers of the same kind."""
    family, kind = base_kind.split(":")
    wrong = rng.sample([a for a in KIND_ANSWERS[(family, kind)] if a != question.answer], 3)
    position = LETTERS.index(letter)
    choices = wrong[:position] + [question.answer] + wrong[position:]
    return Question(question.text + MC_SUFFIX.format(*choices), letter, base_kind, choices)


def _make_scene(
    rng: random.Random, family: str, answer: str, kind: str, size: int, digit_pool: str
) -> Scene:
    if family != "multiple_choice":
        return _scene_for(family, digit_pool)(rng, size, answer, kind)
    base_family, base_kind = kind.split(":")
    base_answer = rng.choice(KIND_ANSWERS[(base_family, base_kind)])
    scene = _scene_for(base_family, digit_pool)(rng, size, base_answer, base_kind)
    wrapped = []
    for index, question in enumerate(scene.questions):
        question_kind = f"{base_family}:{question.kind}"
        if question_kind not in MC_BASE_KINDS:
            continue
        letter = answer if index == 0 else rng.choice(LETTERS)
        wrapped.append(_as_multiple_choice(question, question_kind, letter, rng))
    return Scene(scene.image, wrapped, {**scene.meta, "base_family": base_family})


# ----------------------------------------------------------------------------- generation


def _balanced_pick(options: Sequence[str], seed: int, stream: str, index: int) -> str:
    """The index-th item of a sequence of shuffled blocks, each a permutation of `options`.

    Any prefix of length k*len(options) is exactly balanced, and item i depends only on
    (seed, stream, i), so generating more examples never changes the earlier ones.
    """
    block, offset = divmod(index, len(options))
    order = list(options)
    random.Random(f"{seed}:{stream}:{block}").shuffle(order)
    return order[offset]


def _render_scene(seed: int, index: int, image_size: int, digit_pool: str) -> tuple[str, Scene]:
    family = FAMILIES[index % len(FAMILIES)]
    turn = index // len(FAMILIES)
    answer = _balanced_pick(FAMILY_ANSWERS[family], seed, family, turn)
    kinds = kinds_for_answer(family, answer)
    rng = random.Random(f"{seed}:scene:{index}")
    if family == "multiple_choice":
        kind = _balanced_pick(MC_BASE_KINDS, seed, "mc-kind", turn)
    else:
        kind = kinds[rng.randrange(len(kinds))]
    for attempt in range(100):
        try:
            return family, _make_scene(rng, family, answer, kind, image_size, digit_pool)
        except _PlacementError:
            rng = random.Random(f"{seed}:scene:{index}:retry{attempt}")
    raise RuntimeError(f"could not lay out scene {index} of family {family}")


def _check_args(n: int, image_size: int, digit_pool: str) -> None:
    if n < 0:
        raise ValueError(f"number of examples must be >= 0, got {n}")
    if image_size < 112 or image_size % PATCH_SIZE:
        raise ValueError(
            f"image_size must be a multiple of {PATCH_SIZE} and >= 112, got {image_size}"
        )
    if digit_pool not in DIGIT_POOLS:
        raise ValueError(f"digit_pool must be one of {DIGIT_POOLS}, got {digit_pool!r}")


def generate_examples(
    n: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    questions_per_image: int = 1,
    digit_pool: str = "train",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Generates `n` question records, deterministic in `seed`.

    With `questions_per_image=1` every record has its own image and answers are balanced
    within each family. Larger values ask several questions about one image (records share
    `image_id`), which lets training amortise the vision tower over many answers; only the
    first question of each image is drawn from the balanced cycle.
    `digit_pool` picks which handwritten digit samples may appear ("heldout" for evaluation).
    """
    _check_args(n, image_size, digit_pool)
    if questions_per_image < 1:
        raise ValueError(f"questions_per_image must be >= 1, got {questions_per_image}")
    records: list[dict[str, Any]] = []
    bar = _progress(total=n, desc=f"rendering seed {seed}", enabled=progress)
    index = 0
    while len(records) < n:
        family, scene = _render_scene(seed, index, image_size, digit_pool)
        image_id = f"s{seed}-{index:07d}"
        take = min(questions_per_image, n - len(records), len(scene.questions))
        records.extend(_scene_records(scene, image_id, family, take))
        bar.update(take)
        index += 1
    bar.close()
    return records


def _scene_records(
    scene: Scene, image_id: str, family: str, take: int, with_choices: bool = True
) -> list[dict[str, Any]]:
    """One record per question of ``scene`` (its first ``take``), ids ``{image_id}-q{i}``.

    ``with_choices=False`` writes an empty ``choices`` list whatever the questions hold.
    """
    return [
        {
            "id": f"{image_id}-q{q_index}",
            "image_id": image_id,
            "image": scene.image,
            "question": question.text,
            "answer": question.answer,
            "family": family,
            "kind": question.kind,
            "choices": list(question.choices) if with_choices else [],
            "meta": json.dumps(scene.meta, sort_keys=True),
        }
        for q_index, question in enumerate(scene.questions[:take])
    ]


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="q")


# ----------------------------------------------------------------------------- fashion photos

FASHION_DIR_ENV = "CROSSGET_FASHION_MNIST"
DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES: dict[str, tuple[str, str]] = {
    # pool -> (images, labels); validation and test split the official test set by parity
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "validation": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_INSTALL_HINT = (
    "install it with `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), or name a folder "
    f"holding {FASHION_FILES['train'][0]}, {FASHION_FILES['test'][0]} and their label files with "
    f"--fashion-dir or ${FASHION_DIR_ENV}"
)


class FashionDataMissing(FileNotFoundError):
    """The Fashion-MNIST files are not where they were looked for; the message says the fix."""


def fashion_dir(folder: str | os.PathLike[str] | None = None) -> Path:
    """`folder`, else $CROSSGET_FASHION_MNIST, else the Debian package's folder."""
    return Path(folder or os.environ.get(FASHION_DIR_ENV) or DEFAULT_FASHION_DIR)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (gzip or plain): 4-byte magic, 4-byte big-endian sizes, then uint8 data."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic {found}, expected {magic}")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != math.prod(shape):
        raise ValueError(f"{path}: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


@cache
def _fashion_pool(folder: str, pool: str) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(images, indices by label) of one pool. train: the official training set; validation:
    even, test: odd indices of the official test set, so no pool shares a photo."""
    images_name, labels_name = FASHION_FILES[pool]
    root = Path(folder)
    paths = [root / images_name, root / labels_name]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FashionDataMissing(
            f"Fashion-MNIST not found ({', '.join(missing)}); {FASHION_INSTALL_HINT}"
        )
    images = read_idx(paths[0], 2051)
    labels = read_idx(paths[1], 2049)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    index = np.arange(len(labels))
    if pool != "train":
        index = index[index % 2 == (0 if pool == "validation" else 1)]
    by_label = {label: index[labels[index] == label] for label in range(len(FASHION_CLASSES))}
    empty = [FASHION_CLASSES[label] for label, found in by_label.items() if not len(found)]
    if empty:
        raise ValueError(f"{root}: the {pool} photos have no {', '.join(empty)}")
    return images, by_label


def fashion_photo_ids(records: Sequence[dict[str, Any]]) -> set[tuple[str, int]]:
    """(pool file, photo index) of every photo drawn in `records` (for overlap checks)."""
    ids: set[tuple[str, int]] = set()
    for record in records:
        meta = json.loads(record["meta"])
        for cell in meta["cells"]:
            ids.add((meta["source"], cell["photo"]))
    return ids


def _scene_fashion(
    rng: random.Random, size: int, answer: str, kind: str, folder: str, pool: str
) -> Scene:
    """A 3x3 grid of real product photos; ask what is in a cell, how many of a class there are,
    or whether a class is there (negatives: a class absent from this grid)."""
    images, by_label = _fashion_pool(folder, pool)
    n_cells = FASHION_GRID * FASHION_GRID
    classes = list(range(len(FASHION_CLASSES)))
    query = rng.choice(classes)
    if kind == "cell":
        query = FASHION_CLASSES.index(answer)
    if kind == "count" or (kind == "exists" and answer == "no"):
        hits = int(answer) if kind == "count" else 0
        others = [c for c in classes if c != query]
        grid = [query] * hits + [rng.choice(others) for _ in range(n_cells - hits)]
        rng.shuffle(grid)
    else:
        grid = [rng.choice(classes) for _ in range(n_cells)]
        grid[rng.randrange(n_cells)] = query  # cell / exists-yes: the class is there
    target_cell = rng.choice([i for i, c in enumerate(grid) if c == query] or [0])

    image, draw = _new_canvas(size)
    cell = size // FASHION_GRID
    margin = max(1, cell // 16)
    photo_side = cell - 2 * margin
    offset = (size - cell * FASHION_GRID) // 2
    for k in range(1, FASHION_GRID):
        draw.line((offset + k * cell, 0, offset + k * cell, size - 1), fill=GRID_LINE_RGB)
        draw.line((0, offset + k * cell, size - 1, offset + k * cell), fill=GRID_LINE_RGB)
    cells_meta = []
    for position, label in enumerate(grid):
        candidates = by_label[label]
        photo = int(candidates[rng.randrange(len(candidates))])
        row, column = divmod(position, FASHION_GRID)
        x0 = offset + column * cell + margin
        y0 = offset + row * cell + margin
        tile = Image.fromarray(images[photo], mode="L").resize(
            (photo_side, photo_side), Image.Resampling.BICUBIC
        )
        image.paste(tile.convert("RGB"), (x0, y0))
        cells_meta.append(
            {
                "row": row + 1,
                "column": column + 1,
                "label": FASHION_CLASSES[label],
                "photo": photo,
                "box": [x0, y0, x0 + photo_side, y0 + photo_side],
            }
        )

    def cell_question(index: int) -> Question:
        row, column = divmod(index, FASHION_GRID)
        text = QUESTION_TEMPLATES[(FASHION, "cell")].format(row=row + 1, column=column + 1)
        return Question(text, FASHION_CLASSES[grid[index]], "cell")

    def count_question(label: int) -> Question:
        plural = FASHION_PLURALS[FASHION_CLASSES[label]]
        text = QUESTION_TEMPLATES[(FASHION, "count")].format(plural=plural)
        return Question(text, str(grid.count(label)), "count")

    def exists_question(label: int) -> Question:
        text = QUESTION_TEMPLATES[(FASHION, "exists")].format(item=FASHION_CLASSES[label])
        return Question(text, "yes" if label in grid else "no", "exists")

    if kind == "cell":
        primary = cell_question(target_cell)
    elif kind == "count":
        primary = count_question(query)
    else:
        primary = exists_question(query)
    present = sorted(set(grid))
    absent = [c for c in classes if c not in grid]
    pool_questions = [cell_question(i) for i in range(n_cells)]
    pool_questions.append(exists_question(rng.choice(present)))
    # counts of 0..4 only: a grid can hold five of one class, which has no answer word
    countable = [c for c in present if grid.count(c) <= 4]
    if countable:
        pool_questions.append(count_question(rng.choice(countable)))
    if absent:
        pool_questions += [exists_question(rng.choice(absent)), count_question(rng.choice(absent))]
    meta = {"source": pool, "cells": cells_meta}
    return Scene(image, _unique_questions(primary, pool_questions, rng), meta)


def generate_fashion_examples(
    n: int,
    seed: int,
    pool: str,
    image_size: int = DEFAULT_IMAGE_SIZE,
    questions_per_image: int = 1,
    folder: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """`n` question records of the fashion family, deterministic in (`seed`, `pool`), with
    photos from `pool` only ("train": Fashion-MNIST's training set; "validation"/"test": the
    even/odd halves of its test set). The first question of every image has a balanced answer
    over FAMILY_ANSWERS["fashion"], exactly as the other families' first questions."""
    _check_args(n, image_size, "train")
    if pool not in FASHION_FILES:
        raise ValueError(f"pool must be one of {tuple(FASHION_FILES)}, got {pool!r}")
    if questions_per_image < 1:
        raise ValueError(f"questions_per_image must be >= 1, got {questions_per_image}")
    root = str(fashion_dir(folder).resolve())
    _fashion_pool(root, pool)  # fail before rendering anything
    records: list[dict[str, Any]] = []
    bar = _progress(total=n, desc=f"fashion {pool} seed {seed}", enabled=progress)
    index = 0
    while len(records) < n:
        answer = _balanced_pick(FAMILY_ANSWERS[FASHION], seed, FASHION, index)
        rng = random.Random(f"{seed}:{FASHION}:{index}")
        kinds = kinds_for_answer(FASHION, answer)
        kind = kinds[rng.randrange(len(kinds))]
        scene = _scene_fashion(rng, image_size, answer, kind, root, pool)
        image_id = f"f{seed}-{index:07d}"
        take = min(questions_per_image, n - len(records), len(scene.questions))
        records.extend(_scene_records(scene, image_id, FASHION, take, with_choices=False))
        bar.update(take)
        index += 1
    bar.close()
    return records


# ----------------------------------------------------------------------------- captions

# LLaVA's stage-1 instructions ask for a brief description; a few wordings, as LLaVA uses.
CAPTION_PROMPTS: tuple[str, ...] = (
    "describe the image briefly.",
    "what does this image show?",
    "give a short description of the image.",
    "summarize the picture.",
)
CAPTION_LIST_MAX = 6  # scenes with more shapes are captioned by counts, not one by one


def _place(box: Sequence[int], image_size: int) -> tuple[int, int]:
    """(row, column) of a box's centre in a 3 x 3 division of the image."""
    x, y = _centre(tuple(box))  # type: ignore[arg-type]
    return min(2, int(3 * y / image_size)), min(2, int(3 * x / image_size))


def _place_words(box: Sequence[int], image_size: int) -> str:
    row, column = _place(box, image_size)
    if (row, column) == (1, 1):
        return "the center"
    return f"the {('top', 'middle', 'bottom')[row]} {('left', 'center', 'right')[column]}"


def _join_words(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _grid_rows(cells: Sequence[dict[str, Any]], key: str, sep: str) -> str:
    rows: dict[int, list[tuple[int, str]]] = {}
    for cell in cells:
        rows.setdefault(int(cell["row"]), []).append((int(cell["column"]), str(cell[key])))
    return " ".join(
        f"row {row}: {sep.join(v for _, v in sorted(items))}."
        for row, items in sorted(rows.items())
    )


def scene_caption(meta: dict[str, Any], image_size: int) -> str:
    """A dense caption of a testbed scene written from its metadata, for LLaVA's stage 1.

    LLaVA aligns its projector on image-caption pairs before any question: every caption
    token depends on the image, where a question's answer can often be guessed from the
    question. These captions name what the families ask about (shapes with colour and
    place, counts, digit and photo grids, the code) in plain words and a fixed order, so
    the projector learns to carry it; they are data, not supervision of the model's insides.
    """
    if "cells" in meta:  # Fashion-MNIST grid
        return "a grid of product photos. " + _grid_rows(meta["cells"], "label", ", ")
    if "digits" in meta:  # text scene
        return f"the code {meta['code']} above a grid of digits. " + _grid_rows(
            meta["digits"], "digit", " "
        )
    objects = list(meta.get("objects", []))
    parts: list[str] = []
    if len(objects) > CAPTION_LIST_MAX:
        counts: dict[tuple[str, str], int] = {}
        for obj in objects:
            key = (obj["colour"], obj["shape"])
            counts[key] = counts.get(key, 0) + 1
        for (colour, shape), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            parts.append(f"{n} {colour} {SHAPE_PLURALS[shape] if n > 1 else shape}")
    else:
        ordered = sorted(objects, key=lambda o: (_place(o["box"], image_size), o["box"]))
        for obj in ordered:
            parts.append(
                f"a {obj['colour']} {obj['shape']} at {_place_words(obj['box'], image_size)}"
            )
    for obj in meta.get("small_objects", []):
        parts.append(f"a small {obj['colour']} dot at {_place_words(obj['box'], image_size)}")
    return (_join_words(parts) + ".") if parts else "an empty picture."


def caption_prompt(key: str) -> str:
    """One of `CAPTION_PROMPTS`, fixed per image key (stable across runs and processes)."""
    return CAPTION_PROMPTS[sum(key.encode()) % len(CAPTION_PROMPTS)]


def caption_turn(key: str, meta: str, image_size: int) -> tuple[str, str]:
    """(prompt, caption) of one exported image: its fixed description prompt and the caption
    of its scene metadata (the export's JSON ``meta`` string)."""
    return caption_prompt(key), scene_caption(json.loads(meta), image_size)


# ----------------------------------------------------------------------------- datasets / export


def dataset_features() -> Any:
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "image_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "family": datasets.Value("string"),
            "kind": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "meta": datasets.Value("string"),
        }
    )


def make_dataset_dict(
    train: int,
    validation: int,
    test: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    train_questions_per_image: int = 1,
    progress: bool = False,
    fashion: dict[str, int] | None = None,
    fashion_folder: str | os.PathLike[str] | None = None,
) -> Any:
    """Builds train/validation/test from disjoint seed streams.

    Validation and test use held-out handwritten digits and one question per image (exactly
    balanced); train may pack several questions per image. A split of size 0 is left out
    (`datasets` cannot build an empty table from an empty list of records).
    `fashion` ({split: questions}) appends that many fashion-family questions to each split,
    drawn from their own stream (the other families' records are unchanged), with photos from
    Fashion-MNIST's training set for train and from its test set for validation/test.
    """
    import datasets

    sizes = {"train": train, "validation": validation, "test": test}
    fashion = fashion or {}
    splits = {}
    for split, count in sizes.items():
        if count == 0 and not fashion.get(split):
            continue
        questions_per_image = train_questions_per_image if split == "train" else 1
        records = generate_examples(
            count,
            seed + SPLIT_SEED_OFFSETS[split],
            image_size=image_size,
            questions_per_image=questions_per_image,
            digit_pool="train" if split == "train" else "heldout",
            progress=progress,
        )
        if fashion.get(split):
            records += generate_fashion_examples(
                fashion[split],
                seed + SPLIT_SEED_OFFSETS[split],
                split,
                image_size=image_size,
                questions_per_image=questions_per_image,
                folder=fashion_folder,
                progress=progress,
            )
        splits[split] = datasets.Dataset.from_list(records, features=dataset_features())
    return datasets.DatasetDict(splits)


def load_split(data_dir: str | os.PathLike[str], split: str) -> Any:
    """Opens one split of an export root (`hf/` or `parquet/`) or of a `save_to_disk` folder,
    with an error that says what exists when the folder or split is wrong."""
    import datasets

    root = Path(data_dir)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if (root / "hf").is_dir():
        root = root / "hf"
    elif (root / "parquet").is_dir():
        path = root / "parquet" / f"{split}.parquet"
        if not path.is_file():
            found = sorted(p.stem for p in (root / "parquet").glob("*.parquet"))
            raise ValueError(f"split {split!r} not in {root / 'parquet'}; found {found}")
        return datasets.Dataset.from_parquet(str(path))
    if not ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file()):
        raise FileNotFoundError(
            f"{root} is neither an export root (hf/ or parquet/) nor a save_to_disk folder; "
            "create one with `crossget data make --out DIR`"
        )
    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"split {split!r} not found in {root}; available: {sorted(loaded)}")
        return loaded[split]
    return loaded


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def export(dataset_dict: Any, out_dir: str | os.PathLike[str], progress: bool = False) -> Path:
    """Writes the dataset in every format the project consumes: `hf/` (save_to_disk),
    `parquet/{split}.parquet` with embedded image bytes, LLaVA JSON with an image folder, and an
    lm-eval task YAML that reads the parquet offline. Returns the output directory."""
    import datasets

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for split in dataset_dict:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected a subset of {SPLITS}")

    tmp = _tmp_sibling(out / "hf")
    dataset_dict.save_to_disk(str(tmp))
    replace_folder(tmp, out / "hf")

    tmp = _tmp_sibling(out / "parquet")
    tmp.mkdir()
    for split, dataset in dataset_dict.items():
        dataset = dataset.cast_column("image", datasets.Image(decode=True))
        dataset.to_parquet(str(tmp / f"{split}.parquet"))
        _assert_parquet_embeds_images(tmp / f"{split}.parquet")
    replace_folder(tmp, out / "parquet")

    tmp = _tmp_sibling(out / "llava")
    (tmp / "images").mkdir(parents=True)
    written: set[str] = set()
    for split, dataset in dataset_dict.items():
        rows = []
        plain = dataset.cast_column("image", datasets.Image(decode=False))
        for record in _progress_iter(plain, f"llava {split}", progress):
            file_name = f"{record['image_id']}.png"
            if file_name not in written:
                image_bytes = record["image"]["bytes"]
                if image_bytes is None:
                    image_bytes = Path(record["image"]["path"]).read_bytes()
                (tmp / "images" / file_name).write_bytes(image_bytes)
                written.add(file_name)
            rows.append(
                {
                    "id": record["id"],
                    "image": file_name,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{record['question']}"},
                        {"from": "gpt", "value": record["answer"]},
                    ],
                    "family": record["family"],
                    "kind": record["kind"],
                    "choices": record["choices"],
                }
            )
        (tmp / f"{split}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    replace_folder(tmp, out / "llava")

    (out / "lmeval").mkdir(exist_ok=True)
    atomic_write_text(
        out / "lmeval" / "crossget_testbed.yaml",
        lmeval_task_yaml(out / "parquet", list(dataset_dict)),
    )
    return out


def _progress_iter(items: Any, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not enabled, unit="q")


def _assert_parquet_embeds_images(path: Path) -> None:
    """Fails loudly if the parquet stores image paths instead of the PNG bytes."""
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=["image"]).column("image")
    if column.null_count or column.combine_chunks().field("bytes").null_count:
        raise RuntimeError(f"{path}: image bytes are missing; images must be embedded")


def lmeval_task_yaml(parquet_dir: Path, splits: Sequence[str]) -> str:
    """An lm-eval `generate_until` task over the local parquet (no hub access needed)."""
    parquet_dir = Path(parquet_dir).resolve()
    data_files = "\n".join(
        f"    {split}: {json.dumps(str(parquet_dir / f'{split}.parquet'))}" for split in splits
    )
    test_split = "test" if "test" in splits else splits[-1]
    lines = [
        "# Generated by `python -m eval.testbed.data make`; paths are absolute to this machine.",
        "task: crossget_testbed",
        "dataset_path: parquet",
        "dataset_kwargs:",
        "  data_files:",
        data_files,
        f"test_split: {test_split}",
    ]
    if "validation" in splits:
        lines.append("validation_split: validation")
    lines += [
        "output_type: generate_until",
        "doc_to_image:",
        "  - image",
        'doc_to_text: "<image>\\nUSER: {{question}} ASSISTANT:"',
        "doc_to_target: answer",
        "generation_kwargs:",
        '  until: ["\\n"]',
        "  max_gen_toks: 4",
        "  do_sample: false",
        "metric_list:",
        "  - metric: exact_match",
        "    aggregation: mean",
        "    higher_is_better: true",
        "    ignore_case: true",
        "    ignore_punctuation: true",
        "metadata:",
        "  version: 1.0",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossget data",
        description="Generate the offline CrossGET VQA testbed (deterministic by seed).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser(
        "make",
        help="render train/validation/test and export hf/, parquet/, llava/ and lmeval/",
        description="Render the splits and write OUT/hf (save_to_disk), OUT/parquet/{split}.parquet "
        "(images embedded), OUT/llava/{split}.json + OUT/llava/images/, and "
        "OUT/lmeval/crossget_testbed.yaml.",
    )
    make.add_argument(
        "--out", required=True, type=Path, help="output directory (created if missing)"
    )
    make.add_argument("--train", type=int, default=1000, help="number of train questions")
    make.add_argument("--validation", type=int, default=200, help="number of validation questions")
    make.add_argument("--test", type=int, default=700, help="number of test questions")
    make.add_argument(
        "--seed", type=int, default=0, help="base seed; splits use disjoint offsets of it"
    )
    make.add_argument(
        "--image-size",
        type=int,
        default=DEFAULT_IMAGE_SIZE,
        help="square image side in pixels (224, or 336 for LLaVA-1.5-336); small objects stay < 14 px",
    )
    make.add_argument(
        "--train-questions-per-image",
        type=int,
        default=1,
        help="questions asked about each train image (>1 lets training reuse one image for several "
        "answers; validation/test always use 1)",
    )
    for split in SPLITS:
        make.add_argument(
            f"--fashion-{split}",
            type=int,
            default=0,
            help=f"fashion-family questions (grids of real Fashion-MNIST photos) appended to "
            f"{split}; 0 leaves the family out",
        )
    make.add_argument(
        "--fashion-dir",
        type=Path,
        default=None,
        help=f"folder with the Fashion-MNIST .gz files (default: ${FASHION_DIR_ENV}, else "
        f"{DEFAULT_FASHION_DIR}, from the Debian package dataset-fashion-mnist); when missing "
        "the family is skipped with a message",
    )
    make.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry (`python -m eval.testbed.data make ...`); returns a process exit code."""
    args = _build_parser().parse_args(argv)
    if args.no_progress:
        import datasets

        datasets.disable_progress_bars()
    if args.command == "make":
        for name in ("train", "validation", "test"):
            if getattr(args, name) < 0:
                print(f"error: --{name} must be >= 0", file=sys.stderr)
                return 2
        try:
            _check_args(0, args.image_size, "train")
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        fashion = {split: getattr(args, f"fashion_{split}") for split in SPLITS}
        if any(count < 0 for count in fashion.values()):
            print("error: --fashion-* counts must be >= 0", file=sys.stderr)
            return 2
        if any(fashion.values()):
            try:
                _fashion_pool(str(fashion_dir(args.fashion_dir).resolve()), "train")
            except FashionDataMissing as error:
                print(f"skipping the fashion family: {error}", file=sys.stderr)
                fashion = {}
        dataset_dict = make_dataset_dict(
            args.train,
            args.validation,
            args.test,
            args.seed,
            image_size=args.image_size,
            train_questions_per_image=args.train_questions_per_image,
            progress=not args.no_progress,
            fashion=fashion,
            fashion_folder=args.fashion_dir,
        )
        out = export(dataset_dict, args.out, progress=not args.no_progress)
        sizes = ", ".join(f"{split}={len(ds)}" for split, ds in dataset_dict.items())
        print(f"wrote {sizes} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
