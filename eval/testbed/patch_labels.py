"""Dense per-patch labels from a testbed scene's metadata, for pretraining the vision tower.

Real LLaVA starts from a CLIP tower that already sees colours, shapes and characters; the
testbed model has no such tower and learning one from the answer loss alone is too slow on two
CPU cores. The generator knows what it drew where, so the train split's metadata stands in for
CLIP pretraining: every 14x14 patch gets the colour and shape of the object inked there, whether
an object's centre falls in it, the handwritten digit or printed character in it, and its
row and column. Only ink that is really in the patch counts (pixels away from the background),
so a patch over a triangle's empty corner is background, as it looks.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from eval.testbed.data import (
    BACKGROUND_RGB,
    CODE_DIGITS,
    CODE_LETTERS,
    COLOURS,
    DIGITS,
    PATCH_SIZE,
    SHAPE_PLURALS,
    SHAPES,
    extreme_neighbour,
)

SMALL_DOT = "dot"
CODE_CHARS: tuple[str, ...] = CODE_LETTERS + CODE_DIGITS
# Class 0 of every label is "nothing here".
LABEL_CLASSES: dict[str, tuple[str, ...]] = {
    "colour": ("none", *COLOURS),
    "shape": ("none", *SHAPES, SMALL_DOT),
    "centre": ("no", "yes"),
    "digit": ("none", *DIGITS),
    "char": ("none", *CODE_CHARS),
    "row": (),  # filled in per grid size by label_sizes()
    "column": (),
}
MAX_LIKE_COUNT = 9
# What a tally head counts (training/grounding.GroundingLoss tally_weight): every colour and shape
# of a large object, then every handwritten digit, one patch per thing (its centre patch).
TALLY_CLASSES: tuple[str, ...] = (
    *(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES),
    *(f"digit {digit}" for digit in DIGITS),
)
# Pretraining targets only on request (testbed-train --vision-count-label): on every patch of a
# shape, how many shapes in the image share its colour and shape; on a handwritten digit's
# patches, how many grid cells show that digit. Counting with softmax attention is hard for a
# small LLM (a share of 1 / (n + 1) to read off); a tower that has counted lets a question's
# evidence head read the count like a colour.
# With --vision-neighbour-label: on every patch of a shape, the colour of the shape whose centre
# is clearly nearest / farthest from its own (the generator's 30 % margin, so exactly the
# objects a "nearest/farthest" question may ask about). Choosing that object inside the small
# LLM's attention from row/column channels was right about a third of the time; a tower that
# has compared positions lets the question's evidence head read the neighbour like a colour.
NEIGHBOUR_LABELS: tuple[str, ...] = ("nearest_colour", "farthest_colour")
# With --vision-tally-label: on the centre patch of every large object and handwritten digit,
# its colour-and-shape or digit as one class (`TALLY_CLASSES`), so an LLM tally head can sum
# the kinds with a linear read of each patch instead of first combining colour and shape.
OPTIONAL_LABEL_CLASSES: dict[str, tuple[str, ...]] = {
    "like_count": ("none", *(str(n) for n in range(1, MAX_LIKE_COUNT + 1))),
    "nearest_colour": ("none", *COLOURS),
    "farthest_colour": ("none", *COLOURS),
    "tally": ("none", *TALLY_CLASSES),
}
# Returned by patch_labels() beside LABEL_CLASSES but not pretraining targets: the 1-based grid
# cell (row, column) a handwritten digit's ink sits in, for grounding "row 2" / "column 3", and
# the patch at each handwritten digit's centre (1 + digit), one per glyph for counting them.
GROUNDING_LABELS: tuple[str, ...] = ("cell_row", "cell_column", "digit_centre")
INK_THRESHOLD = 60  # grid lines (200 on 245) stay below it, shapes and ink are far above
MIN_INK_PIXELS = 8  # of 196: a sliver at a patch border does not make the patch an object


def label_sizes(grid: int, optional: Sequence[str] = ()) -> dict[str, int]:
    """Number of classes of every label for a grid x grid patch layout, plus the `optional`
    ones asked for (keys of OPTIONAL_LABEL_CLASSES)."""
    unknown = sorted(set(optional) - OPTIONAL_LABEL_CLASSES.keys())
    if unknown:
        raise ValueError(
            f"unknown optional patch labels {unknown}; known: {sorted(OPTIONAL_LABEL_CLASSES)}"
        )
    sizes = {name: len(classes) for name, classes in LABEL_CLASSES.items()}
    sizes.update({name: len(OPTIONAL_LABEL_CLASSES[name]) for name in optional})
    sizes["row"] = sizes["column"] = grid
    return sizes


def _ink_mask(pixels: np.ndarray) -> np.ndarray:
    distance = np.abs(pixels.astype(np.int16) - np.array(BACKGROUND_RGB, dtype=np.int16))
    return distance.max(axis=-1) > INK_THRESHOLD


def _ink_per_patch(ink: np.ndarray, box: list[int] | tuple[int, ...], grid: int) -> np.ndarray:
    """How many ink pixels inside `box` fall in each patch, as a (grid*grid,) array."""
    x0, y0, x1, y1 = (int(v) for v in box)
    inside = np.zeros_like(ink)
    inside[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    counts = (ink & inside).reshape(grid, PATCH_SIZE, grid, PATCH_SIZE).sum(axis=(1, 3))
    return counts.reshape(-1)


def _centre_patch(box: list[int] | tuple[int, ...], grid: int) -> int:
    cx = min(grid - 1, int((box[0] + box[2]) / 2 // PATCH_SIZE))
    cy = min(grid - 1, int((box[1] + box[3]) / 2 // PATCH_SIZE))
    return cy * grid + cx


def _assign(
    labels: np.ndarray, best: np.ndarray, counts: np.ndarray, value: int, minimum: int
) -> np.ndarray:
    """Writes `value` where this item has the most ink seen so far (and at least `minimum`);
    returns where it wrote."""
    take = (counts >= minimum) & (counts > best)
    labels[take] = value
    best[take] = counts[take]
    return take


def patch_labels(meta: str | dict[str, Any], pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Labels of every patch of one image, row-major like the vision tower's patch tokens.

    `pixels` is the (H, W, 3) uint8 image exactly as the model sees it (no crop or resize
    relative to the rendered scene, whose boxes are in its pixel coordinates).
    """
    scene = json.loads(meta) if isinstance(meta, str) else meta
    height, width = pixels.shape[:2]
    if height != width or height % PATCH_SIZE:
        raise ValueError(
            f"patch labels need a square image whose side is a multiple of {PATCH_SIZE}, "
            f"got {width}x{height}"
        )
    grid = height // PATCH_SIZE
    n = grid * grid
    ink = _ink_mask(pixels)
    labels = {
        name: np.zeros(n, dtype=np.int64) for name in (*LABEL_CLASSES, *OPTIONAL_LABEL_CLASSES)
    }
    labels["row"] = np.repeat(np.arange(grid), grid)
    labels["column"] = np.tile(np.arange(grid), grid)

    best = np.zeros(n, dtype=np.int64)
    objects = scene.get("objects", [])
    kinds = Counter((obj["colour"], obj["shape"]) for obj in objects)
    boxes = [tuple(obj["box"]) for obj in objects]
    for index, obj in enumerate(objects):
        counts = _ink_per_patch(ink, obj["box"], grid)
        take = (counts >= MIN_INK_PIXELS) & (counts > best)
        labels["colour"][take] = 1 + COLOURS.index(obj["colour"])
        labels["shape"][take] = 1 + SHAPES.index(obj["shape"])
        labels["like_count"][take] = min(MAX_LIKE_COUNT, kinds[obj["colour"], obj["shape"]])
        for name in NEIGHBOUR_LABELS:
            found = extreme_neighbour(boxes, index, name.removesuffix("_colour"))
            labels[name][take] = 0 if found is None else 1 + COLOURS.index(objects[found]["colour"])
        best[take] = counts[take]
        labels["centre"][_centre_patch(obj["box"], grid)] = 1
    for dot in scene.get("small_objects", []):
        # A dot is smaller than a patch: any of its ink marks the patch, over anything else.
        take = _ink_per_patch(ink, dot["box"], grid) > 0
        labels["colour"][take] = 1 + COLOURS.index(dot["colour"])
        labels["shape"][take] = LABEL_CLASSES["shape"].index(SMALL_DOT)
        labels["like_count"][take] = 0
        for name in NEIGHBOUR_LABELS:
            labels[name][take] = 0
        labels["centre"][_centre_patch(dot["box"], grid)] = 1

    best_digit = np.zeros(n, dtype=np.int64)
    for name in GROUNDING_LABELS:
        labels[name] = np.zeros(n, dtype=np.int64)
    glyphs = scene.get("digits", [])
    digit_kinds = Counter(glyph["digit"] for glyph in glyphs)
    for glyph in glyphs:
        counts = _ink_per_patch(ink, glyph["box"], grid)
        won = _assign(labels["digit"], best_digit, counts, 1 + DIGITS.index(glyph["digit"]), 4)
        labels["like_count"][won] = min(MAX_LIKE_COUNT, digit_kinds[glyph["digit"]])
        labels["cell_row"][won] = int(glyph.get("row", 0))
        labels["cell_column"][won] = int(glyph.get("column", 0))
        labels["digit_centre"][_centre_patch(glyph["box"], grid)] = 1 + DIGITS.index(glyph["digit"])
    best_char = np.zeros(n, dtype=np.int64)
    for char in scene.get("code_chars", []):
        counts = _ink_per_patch(ink, char["box"], grid)
        _assign(labels["char"], best_char, counts, 1 + CODE_CHARS.index(char["char"]), 4)
    labels["tally"] = tally_classes(labels) + 1
    return labels


def tally_classes(labels: dict[str, np.ndarray]) -> np.ndarray:
    """(P,) int64: the `TALLY_CLASSES` index of the thing centred on each patch, -1 elsewhere
    (small dots and code characters are not tallied), so the image's histogram of things is a
    sum over patches."""
    classes = np.full(labels["centre"].shape, -1, dtype=np.int64)
    colour, shape = labels["colour"] - 1, labels["shape"] - 1
    large = (labels["centre"] == 1) & (colour >= 0) & (shape >= 0) & (shape < len(SHAPES))
    classes[large] = colour[large] * len(SHAPES) + shape[large]
    digit = labels["digit_centre"] > 0
    classes[digit] = len(COLOURS) * len(SHAPES) + labels["digit_centre"][digit] - 1
    return classes


SINGULAR_SHAPES: dict[str, str] = {plural: shape for shape, plural in SHAPE_PLURALS.items()}


def question_end(words: Sequence[str]) -> int:
    """Index where a multiple-choice question's options "( a ) ..." start (else the length):
    option words are candidates, not what the question is about."""
    return words.index("(") if "(" in words else len(words)


def word_patch_targets(
    words: Sequence[str], labels: dict[str, np.ndarray], keep_absent: bool = False
) -> list[tuple[int, np.ndarray]]:
    """Which patches each grounded word of a question names: `(word index, patch mask)`.

    Colour words name the patches of that colour, shape words (singular or plural) and "dot"
    the patches of that shape, a digit right after the word "digit" (or a multiple-choice
    option that is a digit) the patches showing that handwritten digit, a number after "row" /
    "column" the digits in that grid row / column, and "code" the printed code characters.
    Words whose referent is absent from the image (an adversarial existence question) get no
    target: there is nothing right to look at (with `keep_absent` they are kept with an empty
    mask, which `evidence_phrases` needs).
    """
    targets = []
    for index, word in enumerate(words):
        previous = words[index - 1] if index > 0 else ""
        if word.isdigit() and previous in ("row", "column"):
            mask = labels[f"cell_{previous}"] == int(word)
        elif word == "code":
            mask = labels["char"] > 0
        elif word in COLOURS:
            mask = labels["colour"] == 1 + COLOURS.index(word)
        elif word in SHAPES or word in SINGULAR_SHAPES or word == SMALL_DOT:
            shape = SINGULAR_SHAPES.get(word, word)
            mask = labels["shape"] == LABEL_CLASSES["shape"].index(shape)
        elif word in DIGITS and previous in ("digit", ")"):  # "the digit 7", option "(a) 7"
            mask = labels["digit"] == 1 + DIGITS.index(word)
        else:
            continue
        if keep_absent or mask.any():
            targets.append((index, mask))
    return targets


def evidence_phrases(
    words: Sequence[str], targets: Sequence[tuple[int, np.ndarray]]
) -> list[np.ndarray]:
    """The patches of each thing the question names, in question order, from its grounded
    words (`targets`, taken with `keep_absent=True`).

    Words that name one thing together ("red circle", "row 2 column 3") intersect; when the
    whole question's intersection is empty it names several things ("the red circle relative
    to the blue square"), and each run of adjacent grounded words is one of them. Multiple-choice
    options are not part of the question, and things absent from the image (a count of zero, an
    adversarial existence question) are left out.
    """
    kept = [(i, m) for i, m in targets if i < question_end(words)]
    if not kept:
        return []
    everything = np.logical_and.reduce([m for _, m in kept])
    if everything.any():
        return [everything]
    phrases: list[list[np.ndarray]] = []
    last = -2
    for index, mask in kept:
        if index == last + 1:
            phrases[-1].append(mask)
        else:
            phrases.append([mask])
        last = index
    return [m for m in (np.logical_and.reduce(p) for p in phrases) if m.any()]


def count_targets(words: Sequence[str], labels: dict[str, np.ndarray]) -> np.ndarray | None:
    """For a "how many" question, the one patch at the centre of each thing to count (an
    object of the named colour and shape, or a handwritten digit); None for other questions.

    One patch per thing, so attention spread evenly over them and a fixed sink holds the count
    in the sink's share, 1 / (n + 1), which a softmax over the things alone would lose.
    """
    question = list(words[: question_end(words)])
    if "how" not in question or "many" not in question:
        return None
    for index, word in enumerate(question):
        if word in DIGITS and index > 0 and question[index - 1] == "digit":
            return labels["digit_centre"] == 1 + DIGITS.index(word)
    colours = [w for w in question if w in COLOURS]
    shapes = [SINGULAR_SHAPES[w] for w in question if w in SINGULAR_SHAPES]
    if len(colours) != 1 or len(shapes) != 1:
        return None
    return (
        (labels["centre"] == 1)
        & (labels["colour"] == 1 + COLOURS.index(colours[0]))
        & (labels["shape"] == LABEL_CLASSES["shape"].index(shapes[0]))
    )


def option_words(words: Sequence[str]) -> dict[str, int]:
    """Multiple-choice option letter -> index of its option word ("( a ) red" -> "a": 3)."""
    found = {}
    for index in range(3, len(words)):
        if words[index - 3] == "(" and words[index - 1] == ")":
            found[words[index - 2]] = index
    return found


# A supervised attention row: (query word index, patch mask) or (query word index, word indices).
Target = tuple[int, "np.ndarray | list[int]"]


NEIGHBOUR_QUERIES: tuple[str, ...] = ("last", "colour")


def attention_targets(
    words: Sequence[str],
    labels: dict[str, np.ndarray],
    answer: str,
    neighbour_query: str = "last",
) -> dict[str, list[Target]]:
    """Every attention target of one question (a prompt ending in the token that predicts the
    answer), by the name of the supervision that uses it (training/grounding.SUPERVISIONS).

    First layer: each grounded word -> its patches ("grounding"); the answer position -> the
    question's first run of colour/shape/digit/... words, present in the image or not
    ("question"), and the rest ("question2"); each option word -> its letter ("letter"). Last
    layer, all at the answer position: the question's words again, which now carry what they
    saw ("readout"); the first thing named ("evidence") or, for a count, the things to count
    ("count"); the second thing named ("second"); the option word that is right ("option");
    every patch alike, whatever the question ("tally", see `tally_classes`).
    A code's letter and digit are its first and second thing. A middle layer (three or more
    layers): the nearest / farthest object, from the anchor's last word ("neighbour"), or with
    `neighbour_query="colour"` from its colour word: a spatial scene's colours are distinct,
    so the colour word's first-layer grounding finds the anchor alone, where its shape word
    also finds every other object of that shape (about half the scenes have one).
    """
    if neighbour_query not in NEIGHBOUR_QUERIES:
        raise ValueError(
            f"neighbour_query must be one of {NEIGHBOUR_QUERIES}, got {neighbour_query!r}"
        )
    all_words = word_patch_targets(words, labels, keep_absent=True)
    grounds = [(i, m) for i, m in all_words if m.any()]
    answer_at = len(words) - 1
    targets: dict[str, list[Target]] = {"grounding": list(grounds)}
    # Absent words too: "how many yellow triangles" must ask for triangles even with none there.
    question_words = [i for i, _ in all_words if i < question_end(words)]
    if question_words:
        # Two heads keep the first run of adjacent words apart from the rest, so the answer
        # position knows which of "red circle" / "blue square" (row 2 / column 3) came first.
        first_run = [i for n, i in enumerate(question_words) if i == question_words[0] + n]
        targets["question"] = [(answer_at, first_run)]
        if len(first_run) < len(question_words):
            targets["question2"] = [(answer_at, question_words[len(first_run) :])]
        targets["readout"] = [(answer_at, question_words)]
    phrases = evidence_phrases(words, all_words)
    count = count_targets(words, labels)
    if count is not None:
        targets["count"] = [(answer_at, count)]
    elif "code" in words[: question_end(words)]:
        # A code is a letter then a digit: read the two apart.
        letters = [1 + CODE_CHARS.index(c) for c in CODE_LETTERS]
        digits = [1 + CODE_CHARS.index(c) for c in CODE_DIGITS]
        targets["evidence"] = [(answer_at, np.isin(labels["char"], letters))]
        targets["second"] = [(answer_at, np.isin(labels["char"], digits))]
    else:
        targets["evidence"] = [(answer_at, m) for m in phrases[:1]]
        targets["second"] = [(answer_at, m) for m in phrases[1:2]]
    if phrases and answer in COLOURS and ("nearest" in words or "farthest" in words):
        # The anchor's last word, which knows where the anchor is after the first layer, finds
        # the nearest / farthest object (the one of the answer's colour); needs three layers.
        colour = labels["colour"] == 1 + COLOURS.index(answer)
        query = question_words[-1]
        if neighbour_query == "colour":
            query = next((i for i in reversed(question_words) if words[i] in COLOURS), query)
        targets["neighbour"] = [(query, colour)]
    targets["tally"] = [(answer_at, np.ones(labels["centre"].shape, dtype=bool))]
    options = option_words(words)
    targets["letter"] = [(index, [index - 2]) for index in options.values()]
    if answer in options:
        targets["option"] = [(answer_at, [options[answer]])]
    return {name: rows for name, rows in targets.items() if rows}


__all__ = [
    "GROUNDING_LABELS",
    "LABEL_CLASSES",
    "MAX_LIKE_COUNT",
    "OPTIONAL_LABEL_CLASSES",
    "TALLY_CLASSES",
    "attention_targets",
    "count_targets",
    "evidence_phrases",
    "label_sizes",
    "option_words",
    "patch_labels",
    "question_end",
    "tally_classes",
    "word_patch_targets",
]
