"""Benchmark metrics for multimodal LLMs, each a pure function mirroring one reference script.

Token merging changes what a model answers, so every number this project reports must be
comparable with the numbers published for the unmerged models. Each metric below therefore
re-implements the scoring of the script those numbers came from, quirks included, and names that
script in its docstring. Where the reference script is ambiguous or crashes, the chosen behaviour
is written down next to the code.

References (read at these revisions):

* VQAv2: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at a013f00
  ("Fixed processing answers bug", 2021), the version EvalAI runs.
* TextVQA: haotian-liu/LLaVA ``llava/eval/m4c_evaluator.py`` (``EvalAIAnswerProcessor``,
  ``TextVQAAccuracyEvaluator``) as called by ``llava/eval/eval_textvqa.py``.
* GQA: LLaVA ``scripts/convert_gqa_for_eval.py`` followed by the official GQA ``eval.py``.
* POPE: LLaVA ``llava/eval/eval_pope.py``.
* ScienceQA: LLaVA ``llava/eval/eval_science_qa.py``.
* MME: EvolvingLMMs-Lab/lmms-eval ``lmms_eval/tasks/mme/utils.py``.
* MMBench: lmms-eval ``lmms_eval/tasks/mmbench/mmbench_evals.py`` (``MMBench_Evaluator``).

Units follow what each reference reports: per-question scores are in [0, 1]; VQAv2, TextVQA,
GQA, ScienceQA and MMBench aggregates are percentages; POPE metrics are fractions (as
``eval_pope.py`` prints them); MME scores are points (0..200 per category); the project's own
testbed helpers (``score_exact_match``, ``per_group_accuracy``) are fractions.

Bad input (length mismatch, empty ground truth, unknown category or answer type) raises
``ValueError`` naming what is wrong, instead of the reference scripts' asserts or crashes.
"""

import math
import re
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Shared validation
# ---------------------------------------------------------------------------------------------


def _require_same_length(
    first_name: str, first: Sequence, second_name: str, second: Sequence
) -> None:
    if len(first) != len(second):
        raise ValueError(
            f"{first_name} and {second_name} must have the same length, "
            f"got {len(first)} and {len(second)}"
        )


def _require_nonempty(name: str, items: Sequence) -> None:
    if len(items) == 0:
        raise ValueError(f"{name} is empty; a score over zero items is undefined")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------
# VQAv2 answer normalisation (vqaEval.py)
# ---------------------------------------------------------------------------------------------

# vqaEval.py ``self.contractions`` at a013f00 (straight apostrophes; the 2015 version used curly
# ones in the values). Two entries are surprising but kept because they change scores:
# "somebody'd" maps to "somebodyd" (reversed), and the capitalised keys ("Im", "Ive", "Id've",
# "I'dve") can never match because words are lower-cased before the lookup.
VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

# vqaEval.py ``self.manualMap``: only whole words "none", "zero" .. "ten" become digits.
VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

VQA_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# vqaEval.py ``self.punct`` at a013f00. The apostrophe and the colon are NOT in the list (they
# were in the 2015 version), so "don't" and "10:30" survive normalisation; the period is handled
# separately by ``_PERIOD_NOT_BEFORE_DIGIT``.
VQA_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)  # fmt: skip

# vqaEval.py ``commaStrip``: a comma between two digits ("3,000"). Its presence anywhere in the
# answer switches punctuation handling from "replace by a space" to "delete".
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")

# vqaEval.py ``periodStrip`` is ``(?!<=\d)(\.)(?!\d)``. The first group was meant as a
# look-behind but is a look-ahead for the literal "<=" followed by a digit, which can never match
# where a "." starts, so the rule is just: delete every period not followed by a digit ("1.x"
# becomes "1x", "3.5" stays).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

# vqaEval.py calls ``periodStrip.sub("", outText, re.UNICODE)``; the third positional argument of
# ``Pattern.sub`` is ``count``, and ``re.UNICODE == 32``, so at most 32 periods are deleted.
_VQA_MAX_PERIODS_STRIPPED = 32


def _replace_newlines_and_tabs(text: str) -> str:
    """vqaEval.py's first step for every answer: newline and tab become spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _vqa_process_punctuation(text: str) -> str:
    """Mirror vqaEval.py ``processPunctuation``.

    Each punctuation mark is deleted when it touches a space anywhere in the *original* text, or
    when the text holds a comma between digits; otherwise it is replaced by a space (so
    "black-and-white" splits into words while "3,000" becomes "3000").
    """
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    processed = text
    for mark in VQA_PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        processed = processed.replace(mark, "" if touches_space or has_digit_comma else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", processed, count=_VQA_MAX_PERIODS_STRIPPED)


def _vqa_process_digits_and_articles(text: str) -> str:
    """Mirror vqaEval.py ``processDigitArticle``: lower-case, split on whitespace, map number
    words to digits, drop articles, expand contractions, re-join with single spaces."""
    words = [VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    kept_words = [word for word in words if word not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in kept_words)


def normalize_answer(text: str) -> str:
    """Full official VQAv2 answer normalisation (vqaEval.py, applied unconditionally).

    Newlines/tabs to spaces and strip, then ``processPunctuation``, then
    ``processDigitArticle``. Note that ``vqa_accuracy`` applies this only conditionally, exactly
    as the official evaluator does.
    """
    return _vqa_process_digits_and_articles(
        _vqa_process_punctuation(_replace_newlines_and_tabs(text))
    )


def _leave_one_out_accuracy(answer: str, gt_answers: Sequence[str]) -> float:
    """VQA soft accuracy: for each human answer left out, min(#other humans agreeing / 3, 1);
    averaged over the left-out choices. With 10 humans, 3 agreeing gives 0.9, not 1.0."""
    per_fold_accuracy = []
    for left_out_index in range(len(gt_answers)):
        matching = sum(
            1
            for index, gt_answer in enumerate(gt_answers)
            if index != left_out_index and gt_answer == answer
        )
        per_fold_accuracy.append(min(1.0, matching / 3))
    return _mean(per_fold_accuracy)


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Official VQAv2 accuracy of one prediction against its human answers, in [0, 1].

    Mirrors ``VQAEval.evaluate`` at a013f00. Surprising but official: punctuation, digit and
    article processing is applied to the prediction *and* to the human answers only when the
    human answers are not all identical; otherwise both sides only get newline/tab replacement
    and strip. So with ten human answers "2", the prediction "two" scores 0.0 and "Yes" against
    ten "yes" scores 0.0. (LLaVA avoids this by passing predictions through
    ``evalai_process_answer`` before submission.)
    """
    if len(gt_answers) == 0:
        raise ValueError("gt_answers is empty; VQA accuracy needs at least one human answer")
    gt_cleaned = [_replace_newlines_and_tabs(answer) for answer in gt_answers]
    prediction_cleaned = _replace_newlines_and_tabs(prediction)
    if len(set(gt_cleaned)) > 1:
        gt_cleaned = [
            _vqa_process_digits_and_articles(_vqa_process_punctuation(answer))
            for answer in gt_cleaned
        ]
        prediction_cleaned = _vqa_process_digits_and_articles(
            _vqa_process_punctuation(prediction_cleaned)
        )
    return _leave_one_out_accuracy(prediction_cleaned, gt_cleaned)


VQA_ANSWER_TYPES: frozenset[str] = frozenset({"yes/no", "number", "other"})


def _gt_answer_strings(annotation: Mapping, position: int) -> list[str]:
    """Accept answers either as strings or as the official ``{"answer": ...}`` dicts."""
    if "answers" not in annotation:
        raise ValueError(f"annotation {position} has no 'answers' field")
    return [
        answer["answer"] if isinstance(answer, Mapping) else answer
        for answer in annotation["answers"]
    ]


def vqa_score(predictions: Sequence[str], annotations: Sequence[Mapping], ndigits: int = 2) -> dict:
    """VQAv2 accuracy over a set of questions, in percent, as ``VQAEval.setAccuracy`` reports.

    Each annotation holds ``answers`` (strings or ``{"answer": str}`` dicts), ``answer_type``
    (one of "yes/no", "number", "other") and optionally ``question_type``. Percentages are
    rounded to ``ndigits`` decimals as the official evaluator does (its ``n=2``). Per-type
    averages use the leave-one-out average of each question (the fixed behaviour since 2015;
    the very first release appended only the last fold's accuracy).
    """
    _require_same_length("predictions", predictions, "annotations", annotations)
    _require_nonempty("predictions", predictions)
    accuracies: list[float] = []
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for position, (prediction, annotation) in enumerate(zip(predictions, annotations, strict=True)):
        answer_type = annotation.get("answer_type")
        if answer_type not in VQA_ANSWER_TYPES:
            raise ValueError(
                f"annotation {position} has unknown answer_type {answer_type!r}; "
                f"expected one of {sorted(VQA_ANSWER_TYPES)}"
            )
        accuracy = vqa_accuracy(prediction, _gt_answer_strings(annotation, position))
        accuracies.append(accuracy)
        by_answer_type[answer_type].append(accuracy)
        if "question_type" in annotation:
            by_question_type[annotation["question_type"]].append(accuracy)

    def as_percent(values: Sequence[float]) -> float:
        return round(100 * _mean(values), ndigits)

    result: dict = {
        "overall": as_percent(accuracies),
        "per_answer_type": {kind: as_percent(values) for kind, values in by_answer_type.items()},
    }
    if by_question_type:
        result["per_question_type"] = {
            kind: as_percent(values) for kind, values in by_question_type.items()
        }
    return result


# ---------------------------------------------------------------------------------------------
# TextVQA (LLaVA m4c_evaluator.py)
# ---------------------------------------------------------------------------------------------

# m4c ``EvalAIAnswerProcessor.COMMA_STRIP`` uses look-arounds (unlike vqaEval's groups). It is
# only a switch, and EvalAI deletes every comma before it runs, so in practice it never fires.
_EVALAI_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(,)+(?=\d)")


def _evalai_tokenize(text: str) -> str:
    """m4c ``word_tokenize``: lower-case, delete every "," and "?", split off possessive "'s"."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def _evalai_process_punctuation(text: str) -> str:
    """m4c ``process_punctuation``: same rule as vqaEval.py, with its own comma switch."""
    has_digit_comma = _EVALAI_COMMA_BETWEEN_DIGITS.search(text) is not None
    processed = text
    for mark in VQA_PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        processed = processed.replace(mark, "" if touches_space or has_digit_comma else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", processed, count=_VQA_MAX_PERIODS_STRIPPED)


def evalai_process_answer(text: str) -> str:
    """Mirror m4c ``EvalAIAnswerProcessor.__call__`` (also LLaVA's VQAv2 submission step).

    Differs from ``normalize_answer``: all commas and question marks are deleted first (so
    "3,000" -> "3000" and "a,b" -> "ab" rather than "a b"), and "'s" is split into its own word
    ("man's" -> "man 's"). Contractions, number words and articles are the same tables.
    """
    tokenized = _replace_newlines_and_tabs(_evalai_tokenize(text))
    return _vqa_process_digits_and_articles(_evalai_process_punctuation(tokenized))


TEXTVQA_ANSWERS_PER_QUESTION = 10


def textvqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """TextVQA soft accuracy of one prediction, in [0, 1] (m4c ``TextVQAAccuracyEvaluator``).

    Unlike vqaEval.py, the EvalAI processor is applied to the prediction and to every human
    answer unconditionally. The reference asserts exactly 10 human answers; so do we.
    """
    if len(gt_answers) != TEXTVQA_ANSWERS_PER_QUESTION:
        raise ValueError(
            f"TextVQA needs exactly {TEXTVQA_ANSWERS_PER_QUESTION} human answers per question, "
            f"got {len(gt_answers)}"
        )
    processed_gt = [evalai_process_answer(answer) for answer in gt_answers]
    return _leave_one_out_accuracy(evalai_process_answer(prediction), processed_gt)


def textvqa_score(predictions: Sequence[str], gt_answers: Sequence[Sequence[str]]) -> float:
    """Mean TextVQA accuracy in percent, as ``eval_textvqa.py`` prints it (100 x mean)."""
    _require_same_length("predictions", predictions, "gt_answers", gt_answers)
    _require_nonempty("predictions", predictions)
    scores = [
        textvqa_accuracy(prediction, answers)
        for prediction, answers in zip(predictions, gt_answers, strict=True)
    ]
    return 100 * _mean(scores)


# ---------------------------------------------------------------------------------------------
# GQA (LLaVA convert_gqa_for_eval.py + official GQA eval.py)
# ---------------------------------------------------------------------------------------------


def gqa_normalize_prediction(text: str) -> str:
    """LLaVA's GQA post-processing: strip (``model_vqa_loader`` strips decoded text), drop
    trailing periods, lower-case. No article or punctuation removal: "the table" != "table".

    lmms-eval's GQA task differs (it deletes all punctuation on both sides); we follow LLaVA,
    whose numbers the CrossGET paper compares against.
    """
    return text.strip().rstrip(".").lower()


def gqa_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """GQA accuracy in percent: the official ``eval.py`` compares ``predicted == gold`` as raw
    strings, after LLaVA's ``gqa_normalize_prediction`` on the prediction only."""
    _require_same_length("predictions", predictions, "answers", answers)
    _require_nonempty("predictions", predictions)
    hits = [
        gqa_normalize_prediction(prediction) == answer
        for prediction, answer in zip(predictions, answers, strict=True)
    ]
    return 100 * _mean(hits)


# ---------------------------------------------------------------------------------------------
# POPE (LLaVA eval_pope.py)
# ---------------------------------------------------------------------------------------------

_POPE_NEGATIVE_WORDS = frozenset({"No", "not", "no"})


def pope_parse_answer(text: str) -> str:
    """Mirror ``eval_pope.py``: keep the text before the first ".", delete commas, split on
    single spaces; any word equal to "No", "no" or "not" means "no", everything else "yes".

    Surprising but official: the match is case-sensitive and exact per word, so "NO" and
    "No!" parse as "yes", and a newline does not separate words.
    """
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(word in _POPE_NEGATIVE_WORDS for word in words) else "yes"


def _pope_label(label: str, position: int) -> str:
    normalized = label.strip().lower()
    if normalized not in ("yes", "no"):
        raise ValueError(f"POPE label {position} is {label!r}; expected 'yes' or 'no'")
    return normalized


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 and yes-ratio as fractions (``eval_pope.py``).

    "yes" is the positive class; ``yes_ratio`` is the share of *predictions* parsed as yes
    (lmms-eval's ``pope_aggregate_yes_ratio`` counts ground-truth labels instead, which says
    nothing about the model). Where ``eval_pope.py`` would divide by zero (no predicted or no
    actual positives) precision/recall/F1 are 0.0, as lmms-eval returns. Raw counts are
    included so callers can pool categories.
    """
    _require_same_length("predictions", predictions, "labels", labels)
    _require_nonempty("predictions", predictions)
    parsed = [pope_parse_answer(prediction) for prediction in predictions]
    gold = [_pope_label(label, position) for position, label in enumerate(labels)]
    pairs = list(zip(parsed, gold, strict=True))
    true_positive = pairs.count(("yes", "yes"))
    false_positive = pairs.count(("yes", "no"))
    true_negative = pairs.count(("no", "no"))
    false_negative = pairs.count(("no", "yes"))
    predicted_positive = true_positive + false_positive
    actual_positive = true_positive + false_negative
    precision = true_positive / predicted_positive if predicted_positive else 0.0
    recall = true_positive / actual_positive if actual_positive else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (true_positive + true_negative) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": predicted_positive / len(pairs),
        "tp": true_positive,
        "fp": false_positive,
        "tn": true_negative,
        "fn": false_negative,
    }


# ---------------------------------------------------------------------------------------------
# MME (lmms-eval tasks/mme/utils.py)
# ---------------------------------------------------------------------------------------------

MME_PERCEPTION_CATEGORIES: tuple[str, ...] = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION_CATEGORIES: tuple[str, ...] = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)


def mme_parse_answer(text: str) -> str:
    """Mirror lmms-eval ``parse_pred_ans`` (from Otter): "yes", "no" or "other".

    Lower-case, strip, delete every "."; exact "yes"/"no"; single letters "y"/"n"; otherwise
    look for "yes" then "no" inside the first four characters. Surprising but official:
    "nothing" and "not sure" parse as "no", "yesterday" as "yes".
    """
    cleaned = text.lower().strip().replace(".", "")
    if cleaned in ("yes", "no"):
        return cleaned
    if len(cleaned) == 1:
        return {"y": "yes", "n": "no"}.get(cleaned, "other")
    prefix = cleaned[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping[str, str]]) -> dict:
    """MME per-category acc, acc+ and score, plus perception and cognition totals (points).

    Each record has ``question_id`` (the image: MME asks two yes/no questions per image),
    ``category``, ``prediction`` and ``answer``. Mirrors lmms-eval ``mme_aggregate_results``:
    per image, acc = share of its two questions right and acc+ = 100 if both are right; the
    category score is the mean over images of acc + acc+ (so 0..200); a total is the sum of
    its categories' scores (perception 0..2000, cognition 0..800). Only categories present
    contribute; a category missing from the records adds nothing to its total.
    """
    known_categories = set(MME_PERCEPTION_CATEGORIES) | set(MME_COGNITION_CATEGORIES)
    correctness: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for position, record in enumerate(records):
        category = record["category"]
        if category not in known_categories:
            raise ValueError(f"MME record {position} has unknown category {category!r}")
        gold = record["answer"].lower().strip().replace(".", "")
        if gold not in ("yes", "no"):
            raise ValueError(f"MME record {position} has answer {record['answer']!r}, not yes/no")
        is_correct = mme_parse_answer(record["prediction"]) == gold
        correctness[category][record["question_id"]].append(is_correct)
    if not correctness:
        raise ValueError("records is empty; MME scores over zero images are undefined")

    per_category: dict[str, dict[str, float]] = {}
    for category, images in correctness.items():
        for image_id, answers in images.items():
            if len(answers) != 2:
                raise ValueError(
                    f"MME image {image_id!r} in {category!r} has {len(answers)} questions; "
                    "MME scores exactly two per image"
                )
        accuracy = 100 * _mean([sum(answers) / 2 for answers in images.values()])
        accuracy_plus = 100 * _mean([float(all(answers)) for answers in images.values()])
        per_category[category] = {
            "acc": accuracy,
            "acc_plus": accuracy_plus,
            "score": accuracy + accuracy_plus,
        }
    return {
        "per_category": per_category,
        "perception": sum(
            scores["score"]
            for category, scores in per_category.items()
            if category in MME_PERCEPTION_CATEGORIES
        ),
        "cognition": sum(
            scores["score"]
            for category, scores in per_category.items()
            if category in MME_COGNITION_CATEGORIES
        ),
    }


# ---------------------------------------------------------------------------------------------
# ScienceQA (LLaVA eval_science_qa.py)
# ---------------------------------------------------------------------------------------------

SCIENCEQA_OPTION_LETTERS: tuple[str, ...] = ("A", "B", "C", "D", "E")
SCIENCEQA_FAILED = "FAILED"

# eval_science_qa.py uses ``The answer is ([A-Z]).`` with an unescaped ".", so the letter must be
# followed by any one character: "The answer is B" at the very end of the text fails.
_SCIENCEQA_ANSWER_PHRASE = re.compile(r"The answer is ([A-Z]).")


def scienceqa_parse_option(text: str, options: Sequence[str] = SCIENCEQA_OPTION_LETTERS) -> str:
    """Mirror the option parsing of LLaVA ``eval_science_qa.py``; returns a letter or "FAILED".

    In order: the whole text is an option letter (no strip: " B" fails); the text starts with
    a letter followed by ". "; the phrase "The answer is X" followed by any character occurs
    exactly once (case-sensitive; two occurrences fail). The phrase may yield a letter outside
    ``options`` (e.g. "Z"), as in the reference; ``scienceqa_accuracy`` then scores it wrong.
    """
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    phrase_letters = _SCIENCEQA_ANSWER_PHRASE.findall(text)
    if len(phrase_letters) == 1:
        return phrase_letters[0]
    return SCIENCEQA_FAILED


def scienceqa_accuracy(
    predictions: Sequence[str],
    answer_indices: Sequence[int],
    choices: Sequence[Sequence[str]],
    options: Sequence[str] = SCIENCEQA_OPTION_LETTERS,
) -> float:
    """ScienceQA accuracy in percent (``eval_science_qa.py``).

    A parsed letter counts only if it is among the first ``len(choices)`` option letters and
    its index equals the gold ``answer`` index (``get_pred_idx``); "FAILED" is always wrong.
    """
    _require_same_length("predictions", predictions, "answer_indices", answer_indices)
    _require_same_length("predictions", predictions, "choices", choices)
    _require_nonempty("predictions", predictions)
    hits = []
    for position, (prediction, answer_index, question_choices) in enumerate(
        zip(predictions, answer_indices, choices, strict=True)
    ):
        if len(question_choices) > len(options):
            raise ValueError(
                f"question {position} has {len(question_choices)} choices but only "
                f"{len(options)} option letters"
            )
        if not 0 <= answer_index < len(question_choices):
            raise ValueError(
                f"question {position} has answer index {answer_index} outside its "
                f"{len(question_choices)} choices"
            )
        valid_letters = list(options[: len(question_choices)])
        letter = scienceqa_parse_option(prediction, options)
        predicted_index = valid_letters.index(letter) if letter in valid_letters else -1
        hits.append(predicted_index == answer_index)
    return 100 * _mean(hits)


# ---------------------------------------------------------------------------------------------
# MMBench circular evaluation (lmms-eval mmbench_evals.py)
# ---------------------------------------------------------------------------------------------

# MMBench numbers circular variants of question ``i`` as ``i + k * 1_000_000``.
MMBENCH_CIRCULAR_STRIDE = 1_000_000
_MMBENCH_CHOICE_LETTERS = "ABCD"
_MMBENCH_INFER_LETTERS = "ABCDE"
_MMBENCH_LETTER_WRAPPINGS: tuple[tuple[str, str], ...] = (
    ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
    (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."),
)  # fmt: skip


def _count_wrapped_letters(tokens: Sequence[str], prefix: str = "", suffix: str = "") -> int:
    return sum(1 for letter in _MMBENCH_INFER_LETTERS if f"{prefix}{letter}{suffix}" in tokens)


def _mmbench_infer_letter(prediction: str) -> str | None:
    """Mirror ``MMBench_Evaluator.can_infer_option`` (letters A-E as whitespace tokens).

    A single bare letter token wins, unless the text has more than 3 tokens and one is "A"
    (likely the article); otherwise exactly one letter wrapped like "B.", "(C)" or ":D" wins.
    """
    if "Failed to obtain answer via API" in prediction:
        return None
    tokens = [token.strip() for token in prediction.split()]
    article_like = "A" in tokens and len(tokens) > 3
    if _count_wrapped_letters(tokens) == 1 and not article_like:
        for letter in _MMBENCH_INFER_LETTERS:
            if letter in tokens:
                return letter
    for prefix, suffix in _MMBENCH_LETTER_WRAPPINGS:
        if _count_wrapped_letters(tokens, prefix, suffix) == 1:
            for letter in _MMBENCH_INFER_LETTERS:
                if f"{prefix}{letter}{suffix}" in tokens:
                    return letter
    return None


def _mmbench_infer_from_text(prediction: str, choices: Mapping[str, str]) -> str | None:
    """Mirror ``can_infer_text``: exactly one option text occurs (case-insensitively) inside
    the prediction."""
    lowered = prediction.lower()
    matching = [letter for letter, text in choices.items() if str(text).lower() in lowered]
    return matching[0] if len(matching) == 1 else None


def mmbench_extract_option(prediction: str, choices: Mapping[str, str]) -> str | None:
    """Option letter from free text without a judge model, or None (``can_infer``).

    ``choices`` maps letters A-D to option texts. Tries the letter rules first, then option-
    text matching. May return "E" (the reference's "none of these" letter) from the letter rules.
    """
    return _mmbench_infer_letter(prediction) or _mmbench_infer_from_text(prediction, choices)


def _is_missing_option(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _mmbench_choices(record: Mapping) -> dict[str, str]:
    """``build_choices``: the present options among A-D. lmms-eval fills absent options with
    the string "nan", which then takes part in text matching ("finance" contains "nan"); we
    treat None/NaN as absent and do not reproduce that accident."""
    return {
        letter: str(record[letter])
        for letter in _MMBENCH_CHOICE_LETTERS
        if letter in record and not _is_missing_option(record[letter])
    }


def mmbench_circular_accuracy(records: Iterable[Mapping]) -> dict:
    """MMBench CircularEval accuracy in percent, overall and per category.

    Each record has ``index`` (int; variant ``k`` of question ``i`` has index
    ``i + k * 1_000_000``), ``prediction``, ``answer`` (the gold letter of that variant),
    ``category`` and the option texts under "A".."D". Mirrors ``MMBench_Evaluator.eval_sub_data``:
    a question is correct only if every variant's extracted letter equals that variant's gold
    letter. Where the reference would ask a GPT judge (no letter could be extracted) we count
    the question wrong, so this is a judge-free lower bound of the official number (lmms-eval's
    ``static`` mode instead falls back to a looser regex extractor, ``extract_mcq_answer``). The
    category of a question is that of its un-shifted record (index < 1_000_000).
    """
    variants_by_question: dict[int, list[Mapping]] = defaultdict(list)
    for record in records:
        index = record["index"]
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"MMBench index must be a non-negative int, got {index!r}")
        variants_by_question[index % MMBENCH_CIRCULAR_STRIDE].append(record)
    if not variants_by_question:
        raise ValueError("records is empty; MMBench accuracy over zero questions is undefined")

    hits_by_category: dict[str, list[bool]] = defaultdict(list)
    all_hits: list[bool] = []
    for question_index, variants in sorted(variants_by_question.items()):
        originals = [variant for variant in variants if variant["index"] == question_index]
        if len(originals) != 1:
            raise ValueError(
                f"MMBench question {question_index} needs exactly one un-shifted record "
                f"(index < {MMBENCH_CIRCULAR_STRIDE}), found {len(originals)}"
            )
        all_variants_right = all(
            mmbench_extract_option(variant["prediction"], _mmbench_choices(variant))
            == variant["answer"]
            for variant in sorted(variants, key=lambda variant: variant["index"])
        )
        hits_by_category[originals[0]["category"]].append(all_variants_right)
        all_hits.append(all_variants_right)
    return {
        "overall": 100 * _mean(all_hits),
        "per_category": {
            category: 100 * _mean(hits) for category, hits in hits_by_category.items()
        },
        "num_questions": len(all_hits),
    }


# ---------------------------------------------------------------------------------------------
# Project testbed helpers
# ---------------------------------------------------------------------------------------------


def _exact_match_key(text: str) -> str:
    return normalize_answer(text.strip().lower())


def exact_match_per_item(predictions: Sequence[str], answers: Sequence[str]) -> list[bool]:
    """Per-item exact match after lower/strip and the full VQA ``normalize_answer`` on both
    sides (unconditionally, unlike ``vqa_accuracy``), for the project's own short-answer
    testbed where one gold answer exists."""
    _require_same_length("predictions", predictions, "answers", answers)
    return [
        _exact_match_key(prediction) == _exact_match_key(answer)
        for prediction, answer in zip(predictions, answers, strict=True)
    ]


@dataclass(frozen=True)
class PairedComparison:
    """Two settings scored on the same questions: how many each got right alone, and the
    exact two-sided McNemar p-value of that split (1.0 when they never disagree)."""

    only_first: int
    only_second: int
    total: int
    p_value: float

    @property
    def delta_points(self) -> float:
        """Accuracy of the first minus the second, in percentage points."""
        return 100.0 * (self.only_first - self.only_second) / self.total if self.total else 0.0


def paired_comparison(
    first_correct: Sequence[bool], second_correct: Sequence[bool]
) -> PairedComparison:
    """Compares two settings question by question. Questions both get right or both get wrong
    say nothing about which is better; the discordant ones are a fair coin under "no
    difference", which is far more sensitive than comparing two overall accuracies."""
    _require_same_length("first_correct", first_correct, "second_correct", second_correct)
    only_first = sum(1 for a, b in zip(first_correct, second_correct, strict=True) if a and not b)
    only_second = sum(1 for a, b in zip(first_correct, second_correct, strict=True) if b and not a)
    discordant = only_first + only_second
    tail = sum(math.comb(discordant, k) for k in range(min(only_first, only_second) + 1))
    p_value = min(1.0, 2.0 * tail / 2**discordant) if discordant else 1.0
    return PairedComparison(only_first, only_second, len(first_correct), p_value)


def score_exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction (0..1) of predictions matching their answer under ``exact_match_per_item``."""
    _require_nonempty("predictions", predictions)
    return _mean(exact_match_per_item(predictions, answers))


def per_group_accuracy(
    values: Sequence[float | bool], groups: Sequence[Hashable]
) -> dict[Hashable, float]:
    """Mean of ``values`` within each group, in the units of ``values`` (0/1 flags give
    fractions); groups appear in first-seen order."""
    _require_same_length("values", values, "groups", groups)
    values_by_group: dict[Hashable, list[float]] = {}
    for value, group in zip(values, groups, strict=True):
        values_by_group.setdefault(group, []).append(float(value))
    return {group: _mean(group_values) for group, group_values in values_by_group.items()}
