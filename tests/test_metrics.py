"""Hand-derived worked examples for eval/metrics.py.

Every expected value below was computed by hand from the reference scripts named in
eval/metrics.py (derivations in the comments), not by running the code under test.
"""

import pytest

from eval.metrics import (
    MME_COGNITION_CATEGORIES,
    MME_PERCEPTION_CATEGORIES,
    SCIENCEQA_FAILED,
    evalai_process_answer,
    exact_match_per_item,
    gqa_accuracy,
    mmbench_circular_accuracy,
    mmbench_extract_option,
    mme_parse_answer,
    mme_scores,
    normalize_answer,
    paired_comparison,
    per_group_accuracy,
    pope_metrics,
    pope_parse_answer,
    scienceqa_accuracy,
    scienceqa_parse_option,
    score_exact_match,
    textvqa_accuracy,
    textvqa_score,
    vqa_accuracy,
    vqa_score,
)

# --------------------------------------------------------------------------------------------
# VQAv2 normalisation (vqaEval.py processPunctuation + processDigitArticle)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # contractions table: "dont" -> "don't"; "don't" keeps its apostrophe ("'" is not in punct)
        ("dont", "don't"),
        ("don't", "don't"),
        ("whats that", "what's that"),
        # capitalised keys "Im"/"Ive" are unreachable: words are lower-cased before lookup
        ("Im", "im"),
        # the official table maps "somebody'd" backwards to "somebodyd"
        ("somebody'd", "somebodyd"),
        # articles a/an/the are dropped as whole words only
        ("The cat", "cat"),
        ("a dog and an apple", "dog and apple"),
        ("theater", "theater"),
        # number words none/zero..ten map to digits; "eleven" is not in the map
        ("two dogs", "2 dogs"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        # period not followed by a digit is deleted; "3.5" keeps its decimal point
        ("yes.", "yes"),
        ("3.5", "3.5"),
        # comma between digits -> every listed punctuation mark is deleted (no space)
        ("3,000", "3000"),
        ("1,2 and a,b", "12 and ab"),
        # no digit comma and mark not touching a space -> mark becomes a space
        ("black-and-white", "black and white"),
        ("hello,world", "hello world"),
        # mark touching a space -> deleted; then whitespace split collapses runs of spaces
        ("yes, it is", "yes it is"),
        ("x - y", "x y"),
        # ":" is not in the current punct list
        ("10:30", "10:30"),
        # newline/tab become spaces, then strip; lower-casing in processDigitArticle
        (" Yes\n", "yes"),
        ("red\tCar", "red car"),
        ("  many   spaces ", "many spaces"),
    ],
)
def test_normalize_answer_worked_examples(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_normalize_answer_strips_at_most_32_periods() -> None:
    # vqaEval.py passes re.UNICODE (== 32) as the positional `count` of Pattern.sub:
    # 40 periods -> 32 deleted -> 8 remain.
    assert normalize_answer("." * 40) == "." * 8


# --------------------------------------------------------------------------------------------
# VQAv2 accuracy (vqaEval.py evaluate, leave-one-out)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matching_humans", "expected"),
    [
        # k of 10 humans say "2", the rest "3"; answers differ so "two" is normalised to "2".
        # fold leaving out a matching human: min((k-1)/3, 1); any other fold: min(k/3, 1).
        # mean = [k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)] / 10
        (0, 0.0),  # 0
        (1, 0.3),  # (1*0 + 9*(1/3)) / 10 = 3/10
        (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3*(2/3) + 7*1) / 10 = 9/10  (three humans are NOT enough for 1.0)
        (4, 1.0),  # (4*1 + 6*1) / 10
    ],
)
def test_vqa_accuracy_leave_one_out(matching_humans: int, expected: float) -> None:
    gt_answers = ["2"] * matching_humans + ["3"] * (10 - matching_humans)
    assert vqa_accuracy("two", gt_answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "gt_answers", "expected"),
    [
        # all ten answers identical -> the official script does NOT normalise the prediction:
        # "two" != "2" and "Yes" != "yes" score 0 ...
        ("two", ["2"] * 10, 0.0),
        ("Yes", ["yes"] * 10, 0.0),
        # ... but newline/tab replacement and strip still apply to both sides
        (" yes\n", ["yes"] * 10, 1.0),
        # one dissenting human -> both sides normalised: "Yes" -> "yes", 9 humans agree -> 1.0
        ("Yes", ["yes"] * 9 + ["no"], 1.0),
        # dissent also normalises the humans: "a dog" -> "dog", 4 agree, 6 say "cat" -> 1.0
        ("Dog.", ["a dog"] * 4 + ["cat"] * 6, 1.0),
    ],
)
def test_vqa_accuracy_normalises_only_when_answers_differ(
    prediction: str, gt_answers: list[str], expected: float
) -> None:
    assert vqa_accuracy(prediction, gt_answers) == pytest.approx(expected)


def test_vqa_accuracy_rejects_empty_gt() -> None:
    with pytest.raises(ValueError, match="gt_answers is empty"):
        vqa_accuracy("yes", [])


def test_vqa_score_overall_and_per_answer_type() -> None:
    # q1: "yes" vs ten "yes" -> 1.0; q2: "two" vs two "2" + eight "3" -> 0.6 (see above);
    # q3: "blue" vs official dicts, 1 "blue" + 9 "red" -> 0.3.
    # overall = (1.0 + 0.6 + 0.3) / 3 = 0.6333.. -> 63.33; yes/no 100.0; number 60.0; other 30.0
    predictions = ["yes", "two", "blue"]
    annotations = [
        {"answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        {"answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number", "question_type": "how many"},
        {
            "answers": [{"answer": "blue"}] + [{"answer": "red"}] * 9,
            "answer_type": "other",
            "question_type": "what color",
        },
    ]
    result = vqa_score(predictions, annotations)
    assert result["overall"] == 63.33
    assert result["per_answer_type"] == {"yes/no": 100.0, "number": 60.0, "other": 30.0}
    assert result["per_question_type"] == {"is the": 100.0, "how many": 60.0, "what color": 30.0}


def test_vqa_score_rejects_unknown_answer_type_and_length_mismatch() -> None:
    with pytest.raises(ValueError, match="unknown answer_type 'colour'"):
        vqa_score(["red"], [{"answers": ["red"] * 10, "answer_type": "colour"}])
    with pytest.raises(ValueError, match="same length"):
        vqa_score(["red", "blue"], [{"answers": ["red"] * 10, "answer_type": "other"}])


# --------------------------------------------------------------------------------------------
# TextVQA (m4c EvalAIAnswerProcessor + TextVQAAccuracyEvaluator)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # word_tokenize: lower, delete ",", "?", then "'s" -> " 's"; article "the" dropped
        ("The Man's hat?", "man 's hat"),
        # commas deleted outright, even between letters (vqaEval would give "a b")
        ("a,b", "ab"),
        ("3,000", "3000"),
        ("Two", "2"),
        ("coca-cola", "coca cola"),
    ],
)
def test_evalai_process_answer(raw: str, expected: str) -> None:
    assert evalai_process_answer(raw) == expected


def test_textvqa_processes_identical_answers_unlike_vqa() -> None:
    # EvalAI processing is unconditional: "Two" -> "2" matches ten "2" -> 1.0,
    # while the official VQA script scores the same pair 0.0 (answers all identical).
    assert textvqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("Two", ["2"] * 10) == 0.0


def test_textvqa_score_and_answer_count() -> None:
    # q1: 2 of 10 humans -> 0.6; q2: 10 of 10 -> 1.0; mean 0.8 -> 80 %
    gt = [["nike"] * 2 + ["adidas"] * 8, ["stop"] * 10]
    assert textvqa_score(["Nike", "STOP"], gt) == pytest.approx(80.0)
    with pytest.raises(ValueError, match="exactly 10 human answers"):
        textvqa_accuracy("stop", ["stop"] * 9)


# --------------------------------------------------------------------------------------------
# GQA (LLaVA convert_gqa_for_eval.py + GQA eval.py raw equality)
# --------------------------------------------------------------------------------------------


def test_gqa_accuracy() -> None:
    # "Yes." -> rstrip('.') + lower -> "yes" == "yes"; " Left. " -> "left" == "left";
    # "the table" keeps its article -> != "table". 2 of 3 -> 66.67 %
    predictions = ["Yes.", "the table", " Left. "]
    answers = ["yes", "table", "left"]
    assert gqa_accuracy(predictions, answers) == pytest.approx(200 / 3)


# --------------------------------------------------------------------------------------------
# POPE (LLaVA eval_pope.py)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image.", "no"),
        # only the first sentence counts
        ("Yes. There is no cat.", "yes"),
        # case-sensitive exact words: "NO" and "No!" are not in {"No", "no", "not"}
        ("NO", "yes"),
        ("No!", "yes"),
        # "nothing" is not the word "no"
        ("nothing is there", "yes"),
    ],
)
def test_pope_parse_answer(text: str, expected: str) -> None:
    assert pope_parse_answer(text) == expected


def test_pope_metrics_on_a_hand_confusion_matrix() -> None:
    # labels: 4 yes, 6 no. predictions parse to: yes yes yes no | yes yes no no no no
    # TP=3 FN=1 FP=2 TN=4; accuracy 7/10; precision 3/5; recall 3/4;
    # F1 = 2*0.6*0.75/(0.6+0.75) = 0.9/1.35 = 2/3; yes_ratio = 5 predicted yes / 10
    labels = ["yes"] * 4 + ["no"] * 6
    predictions = ["Yes", "Yes.", "yes", "No"] + ["Yes", "yes", "No", "no", "not", "No."]
    result = pope_metrics(predictions, labels)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (3, 2, 4, 1)
    assert result["accuracy"] == pytest.approx(0.7)
    assert result["precision"] == pytest.approx(0.6)
    assert result["recall"] == pytest.approx(0.75)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["yes_ratio"] == pytest.approx(0.5)


def test_pope_metrics_bad_label() -> None:
    with pytest.raises(ValueError, match="expected 'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])


# --------------------------------------------------------------------------------------------
# MME (lmms-eval mme/utils.py)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("y", "yes"),
        ("x", "other"),
        ("Yes, there is a dog.", "yes"),  # "yes" within first 4 chars
        ("Nothing", "no"),  # "no" within "noth"
        ("I know", "other"),  # first 4 chars "i kn" hold neither
        ("maybe", "other"),
    ],
)
def test_mme_parse_answer(text: str, expected: str) -> None:
    assert mme_parse_answer(text) == expected


def test_mme_scores_acc_plus_needs_both_questions() -> None:
    # existence: img1 both right; img2 "Yes" right, "Yes" for gold "No" wrong.
    #   acc = 3/4 = 75; acc+ = 1/2 images = 50; score = 125
    # code_reasoning: one image, both right -> 100 + 100 = 200
    records = [
        {"question_id": "e1", "category": "existence", "prediction": "Yes", "answer": "Yes"},
        {"question_id": "e1", "category": "existence", "prediction": "No", "answer": "No"},
        {"question_id": "e2", "category": "existence", "prediction": "Yes", "answer": "Yes"},
        {"question_id": "e2", "category": "existence", "prediction": "Yes", "answer": "No"},
        {"question_id": "c1", "category": "code_reasoning", "prediction": "yes", "answer": "Yes"},
        {"question_id": "c1", "category": "code_reasoning", "prediction": "no.", "answer": "No"},
    ]
    result = mme_scores(records)
    assert result["per_category"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert result["per_category"]["code_reasoning"]["score"] == 200.0
    assert result["perception"] == 125.0
    assert result["cognition"] == 200.0


def test_mme_category_lists_match_lmms_eval() -> None:
    assert len(MME_PERCEPTION_CATEGORIES) == 10 and "OCR" in MME_PERCEPTION_CATEGORIES
    assert len(MME_COGNITION_CATEGORIES) == 4 and "text_translation" in MME_COGNITION_CATEGORIES


def test_mme_scores_rejects_bad_records() -> None:
    unknown = {"question_id": "i", "category": "vibes", "prediction": "yes", "answer": "yes"}
    with pytest.raises(ValueError, match="unknown category 'vibes'"):
        mme_scores([unknown])
    single = {"question_id": "i", "category": "count", "prediction": "yes", "answer": "yes"}
    with pytest.raises(ValueError, match="exactly two per image"):
        mme_scores([single])


# --------------------------------------------------------------------------------------------
# ScienceQA (LLaVA eval_science_qa.py)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("C. a magnet", "C"),
        ("The answer is B.", "B"),
        ("Because of gravity. The answer is D.", "D"),
        # pattern needs one character after the letter: at end of text it fails
        ("The answer is B", SCIENCEQA_FAILED),
        # two occurrences -> findall returns 2 -> failed
        ("The answer is A. No, the answer is C. The answer is C.", SCIENCEQA_FAILED),
        # no strip before the exact-letter check
        (" B", SCIENCEQA_FAILED),
        ("I am not sure", SCIENCEQA_FAILED),
        # the phrase may yield a letter outside A-E; kept, then scored wrong
        ("The answer is Z.", "Z"),
    ],
)
def test_scienceqa_parse_option(text: str, expected: str) -> None:
    assert scienceqa_parse_option(text) == expected


def test_scienceqa_accuracy() -> None:
    # q1: "B" -> index 1 == gold 1 (right); q2: "C" but only 2 choices -> index -1 (wrong);
    # q3: garbage -> FAILED (wrong); q4: "The answer is A." -> 0 == gold 0 (right). 2/4 = 50 %
    predictions = ["B", "C", "???", "The answer is A."]
    gold = [1, 0, 2, 0]
    choices = [["x", "y", "z"], ["x", "y"], ["x", "y", "z"], ["x", "y"]]
    assert scienceqa_accuracy(predictions, gold, choices) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="answer index 3 outside"):
        scienceqa_accuracy(["A"], [3], [["x", "y"]])


# --------------------------------------------------------------------------------------------
# MMBench circular evaluation (lmms-eval mmbench_evals.py can_infer + eval_sub_data)
# --------------------------------------------------------------------------------------------

CHOICES = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", "B"),
        ("B. cat", "B"),  # no bare letter; wrapping ("", ".") matches once
        ("The answer is (C)", "C"),  # wrapping ("(", ")")
        # "A" token with > 3 tokens is treated as an article; then option text "cat" matches
        ("A cat is on the mat", "B"),
        ("It is a fish", "D"),  # option-text matching, case-insensitive
        ("C or D", None),  # two bare letters, no wrapping, no option text
        ("no idea", None),
    ],
)
def test_mmbench_extract_option(prediction: str, expected: str | None) -> None:
    assert mmbench_extract_option(prediction, CHOICES) == expected


def _circular_records(question: int, category: str, predictions: list[str]) -> list[dict]:
    # Variant k rotates the options left by k, so the gold "A: dog" moves to A, D, C, B.
    texts = ["dog", "cat", "bird", "fish"]
    records = []
    for shift, prediction in enumerate(predictions):
        rotated = texts[shift:] + texts[:shift]
        records.append(
            {
                "index": question + shift * 1_000_000,
                "category": category,
                "prediction": prediction,
                "answer": "ABCD"[rotated.index("dog")],
                **dict(zip("ABCD", rotated, strict=True)),
            }
        )
    return records


def test_mmbench_circular_one_wrong_shift_fails_the_question() -> None:
    # q1 answers A, D, C, B: every shift right -> hit.
    # q2 answers A, D, C, then "A" where the gold is B -> the whole question is wrong.
    # q3 (other category) answers by option text "dog" each time -> hit.
    # overall 2/3; ocr 1/2 = 50 %; color 100 %
    records = (
        _circular_records(1, "ocr", ["A", "D", "C", "B"])
        + _circular_records(2, "ocr", ["A", "D", "C", "A"])
        + _circular_records(3, "color", ["a dog", "a dog", "a dog", "a dog"])
    )
    result = mmbench_circular_accuracy(records)
    assert result["num_questions"] == 3
    assert result["overall"] == pytest.approx(200 / 3)
    assert result["per_category"] == {"ocr": pytest.approx(50.0), "color": pytest.approx(100.0)}


def test_mmbench_circular_requires_the_unshifted_record() -> None:
    shifted_only = _circular_records(7, "ocr", ["A", "D"])[1:]
    with pytest.raises(ValueError, match="exactly one un-shifted record"):
        mmbench_circular_accuracy(shifted_only)


# --------------------------------------------------------------------------------------------
# Testbed helpers
# --------------------------------------------------------------------------------------------


def test_score_exact_match_and_per_group_accuracy() -> None:
    # "Two" ~ "2" (number word), "The Cat." ~ "cat" (article, period), "dog" != "cat"
    predictions = ["Two", "The Cat.", "dog", "yes"]
    answers = ["2", "cat", "cat", "no"]
    flags = exact_match_per_item(predictions, answers)
    assert flags == [True, True, False, False]
    assert score_exact_match(predictions, answers) == pytest.approx(0.5)
    # groups: g1 -> [1, 1] = 1.0, g2 -> [0, 0] = 0.0; merged -> [1, 0] = 0.5 each
    assert per_group_accuracy(flags, ["g1", "g1", "g2", "g2"]) == {"g1": 1.0, "g2": 0.0}
    assert per_group_accuracy(flags, ["x", "y", "y", "x"]) == {"x": 0.5, "y": 0.5}


@pytest.mark.parametrize(
    "call",
    [
        lambda: score_exact_match(["a"], ["a", "b"]),
        lambda: per_group_accuracy([1.0, 0.0], ["g"]),
        lambda: gqa_accuracy(["yes"], []),
        lambda: pope_metrics(["yes", "no"], ["yes"]),
        lambda: textvqa_score(["a"], []),
        lambda: scienceqa_accuracy(["A"], [0, 1], [["x"], ["y"]]),
    ],
)
def test_length_mismatch_raises(call) -> None:
    with pytest.raises(ValueError, match="same length"):
        call()


def test_empty_inputs_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        score_exact_match([], [])
    with pytest.raises(ValueError, match="empty"):
        mme_scores([])
    with pytest.raises(ValueError, match="empty"):
        mmbench_circular_accuracy([])


@pytest.mark.parametrize(
    "only_first,only_second,expected_p",
    [(10, 0, 2 / 1024), (1, 4, 12 / 32), (3, 3, 1.0), (0, 0, 1.0)],
)
def test_paired_comparison_exact_mcnemar(
    only_first: int, only_second: int, expected_p: float
) -> None:
    both, neither = 7, 5
    first = [True] * only_first + [False] * only_second + [True] * both + [False] * neither
    second = [False] * only_first + [True] * only_second + [True] * both + [False] * neither
    result = paired_comparison(first, second)
    assert (result.only_first, result.only_second, result.total) == (
        only_first,
        only_second,
        len(first),
    )
    assert result.p_value == pytest.approx(expected_p)
    assert result.delta_points == pytest.approx(100 * (only_first - only_second) / len(first))
    stats = pytest.importorskip("scipy.stats")
    if only_first + only_second:
        reference = stats.binomtest(only_first, only_first + only_second, 0.5).pvalue
        assert result.p_value == pytest.approx(reference)
    with pytest.raises(ValueError):
        paired_comparison([True], [True, False])
