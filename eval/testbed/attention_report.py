"""How closely a trained testbed model's heads meet the supervised attention targets.

The reference recipe supervises one head per role (training/grounding.SUPERVISIONS). When a
question family stays weak, this tells whether its heads fail to find what they should look at
or whether they find it and the layers after them fail to use it. Each row is scored with the
training loss itself on isolated single-question turns, as the model is asked at evaluation.

    python -m eval.testbed.attention_report --model eval/testbed/reference_model \
        --data data/testbed --evidence-layer 1
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from eval.testbed.patch_labels import NEIGHBOUR_QUERIES
from mllm_crossget import named_models


@torch.no_grad()
def attention_report(
    model: Any,
    processor: Any,
    examples: Sequence[Any],
    layer_overrides: dict[str, int],
    batch_size: int = 16,
    progress: bool = True,
    supervision_overrides: dict[str, dict[str, Any]] | None = None,
    count_shares: dict[int, CountAttention] | None = None,
    neighbour_query: str = "last",
    tally_readings: dict[int, TallyReading] | None = None,
) -> dict[str, dict[str, float]]:
    """Per supervision: rows scored, mean loss per row, and its floor (0 for "all attention on
    the targets"; the entropy of the target for a uniform target such as counting).

    `supervision_overrides` replaces fields of a supervision as the recipe did (the count
    loss's `head` and `sink_weight`). A `count_shares` dict is filled with, per number of
    things to count, where the count head's attention went (`CountAttention`): the BOS share
    is the count a later layer has to read off. `neighbour_query` is the word the recipe asked
    for the nearest/farthest object from (testbed-train --neighbour-query)."""
    from eval.testbed.training.grounding import (
        SUPERVISIONS,
        TALLY_KEY,
        GroundingLoss,
        image_token_positions,
    )

    n_layers = len(model.model.language_model.layers)
    n_heads = model.model.language_model.config.num_attention_heads
    supervisions = {
        name: replace(supervision, **(supervision_overrides or {}).get(name, {}))
        for name, supervision in SUPERVISIONS.items()
    }
    terms = {}
    for name, supervision in supervisions.items():
        layer = layer_overrides.get(name, supervision.layer)
        if supervision.head >= n_heads or not -n_layers <= layer < n_layers:
            continue
        terms[name] = GroundingLoss.for_supervision(model, supervision, 1.0, layer)
    totals = {name: [0.0, 0, 0.0] for name in terms}  # loss sum, rows, floor sum
    head_outputs: dict[str, torch.Tensor] = {}  # o_proj's input, for the tally readings
    hooks = []
    if tally_readings is not None and "tally" in terms:
        hooks.append(
            terms["tally"].attention.o_proj.register_forward_pre_hook(
                lambda module, args: head_outputs.update(tally=args[0])
            )
        )
    try:
        for batch, side in _grounded_batches(
            model, processor, examples, batch_size, progress, "attention report", neighbour_query
        ):
            outputs = model(**batch)
            for name, term in terms.items():
                supervision = supervisions[name]
                used = side[supervision.positions_key] >= 0
                rows = int(used.sum())
                if rows == 0:
                    continue
                total = totals[name]
                total[0] += float(term(model, {**batch, **side}, outputs)) * rows
                total[1] += rows
                if supervision.uniform:
                    things = side[supervision.masks_key][used].sum(dim=-1).double()
                    total[2] += float(_uniform_entropy(things, supervision).sum())
                if name == "count" and count_shares is not None:
                    attention = term.last_log_attention[:, 0].exp()  # (rows, T)
                    image_at = image_token_positions(
                        batch["input_ids"], model.config.image_token_id
                    )
                    image_at = image_at[used.nonzero(as_tuple=True)[0]]  # (rows, P)
                    on_patches = attention.gather(1, image_at)
                    masks = side[supervision.masks_key][used].bool()
                    for row in range(masks.shape[0]):
                        n = int(masks[row].sum())
                        count_shares.setdefault(n, CountAttention()).add(
                            float(attention[row, 0]), on_patches[row], masks[row]
                        )
                if name == "tally" and tally_readings is not None:
                    batch_rows, slots = used.nonzero(as_tuple=True)
                    at = side[supervision.positions_key][batch_rows, slots]
                    _add_tally_readings(
                        tally_readings,
                        head_outputs["tally"][batch_rows, at],
                        side[TALLY_KEY][batch_rows],
                        supervision.head,
                        term.attention.head_dim,
                    )
    finally:
        for handle in (*terms.values(), *hooks):
            handle.remove()
    return {
        name: {
            "layer": float(layer_overrides.get(name, supervisions[name].layer) % n_layers),
            "head": float(supervisions[name].head),
            "rows": float(rows),
            "loss": loss / rows if rows else math.nan,
            "floor": floor / rows if rows else math.nan,
        }
        for name, (loss, rows, floor) in totals.items()
    }


def _grounded_batches(
    model: Any,
    processor: Any,
    examples: Sequence[Any],
    batch_size: int,
    progress: bool,
    desc: str,
    neighbour_query: str = "last",
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(model inputs, attention targets) of the examples' isolated single-question turns, in
    batches, with the model in eval mode while they are used."""
    from eval.testbed.training.grounding import SIDE_KEYS, TURN_IDS_KEY
    from eval.testbed.training.train import collator_for, grounded_dataset, isolated_turns_mask

    dataset = grounded_dataset(
        examples,
        processor,
        model.config.image_seq_length,
        progress,
        neighbour_query=neighbour_query,
    )
    collate = collator_for(processor)
    starts = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc)
    was_training = model.training
    model.eval()
    try:
        for start in starts:
            end = min(len(dataset), start + batch_size)
            batch = collate([dataset[i] for i in range(start, end)])
            side = {key: batch.pop(key) for key in SIDE_KEYS if key in batch}
            batch["attention_mask"] = isolated_turns_mask(side[TURN_IDS_KEY], model)
            yield batch, side
    finally:
        model.train(was_training)


OPTION_HEAD_MODES: tuple[str, ...] = ("as trained", "forced right", "zeroed")


@torch.no_grad()
def option_head_ablation(
    model: Any,
    processor: Any,
    examples: Sequence[Any],
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Multiple-choice accuracy (the letter, greedy) with the option head as trained, with its
    output at the answer forced onto the right option word's value, and zeroed there.

    Whether a model answers from its option head at all: if forcing it right gains nothing and
    zeroing it costs nothing, the answer ignores it (the previous model: 43 / 43 / 40 %)."""
    from eval.testbed.training.grounding import SUPERVISIONS, OptionHeadForcing, position_targets

    option = SUPERVISIONS["option"]
    forcings = {
        "forced right": OptionHeadForcing(model),
        "zeroed": OptionHeadForcing(model, zero=True),
    }
    right = dict.fromkeys(OPTION_HEAD_MODES, 0)
    asked = 0
    try:
        for batch, side in _grounded_batches(
            model, processor, examples, batch_size, progress, "option head ablation"
        ):
            rows, answer_at, _ = position_targets(side, option.positions_key, option.masks_key)
            if rows.numel() == 0:
                continue
            letters = batch["input_ids"][rows, answer_at + 1]
            asked += rows.numel()
            for mode in OPTION_HEAD_MODES:
                forcing = forcings.get(mode)
                if forcing is not None:
                    forcing.prepare(side)
                try:
                    logits = model(**batch).logits
                finally:
                    if forcing is not None:
                        forcing.release()
                right[mode] += int((logits[rows, answer_at].argmax(dim=-1) == letters).sum())
    finally:
        for forcing in forcings.values():
            forcing.remove()
    return {
        mode: {"questions": float(asked), "accuracy": right[mode] / asked if asked else math.nan}
        for mode in OPTION_HEAD_MODES
    }


def _uniform_entropy(things: torch.Tensor, supervision: Any) -> torch.Tensor:
    """Entropy of a uniform target over `things` patches (plus a sink weighing `sink_weight`):
    the lowest cross-entropy a head can reach."""
    sink = supervision.sink_weight if supervision.sink else 0.0
    total = things + sink
    entropy = torch.log(total)
    if sink:
        entropy = entropy - sink * math.log(sink) / total
    return entropy


def sink_share_target(n: int, sink_weight: float = 1.0) -> float:
    """The count head's BOS share when it spreads its attention as trained: k / (n + k)."""
    return sink_weight / (n + sink_weight)


@dataclass
class CountAttention:
    """Where the count head's attention went, summed over the count rows with one number of
    things: on BOS (the sink), on the things' centre patches, on the patches around them, and
    elsewhere; `spread` sums, over rows with two or more things, the coefficient of variation
    of the weights on the things.

    The BOS share only holds the count if the rest sits evenly on one patch per thing. Mass
    beside the things (the rest of each object) or uneven weights make the share noisy; when
    both are small and counts are still wrong, it is the later layers' reading of the share
    that fails."""

    rows: int = 0
    bos: float = 0.0
    things: float = 0.0
    beside: float = 0.0
    elsewhere: float = 0.0
    spread: float = 0.0
    spread_rows: int = 0

    def add(self, bos: float, on_patches: torch.Tensor, things: torch.Tensor) -> None:
        """One row: its BOS weight, its weights on the P patches (a square grid, row-major),
        and the bool mask of the things' patches."""
        grid = math.isqrt(on_patches.numel())
        if grid * grid != on_patches.numel() or things.shape != on_patches.shape:
            raise ValueError(
                f"{on_patches.numel()} patch weights and a mask of {things.numel()}: "
                "need one weight and one mask entry per patch of a square grid"
            )
        mask = things.reshape(1, 1, grid, grid).float()
        around = F.max_pool2d(mask, 3, stride=1, padding=1).reshape(-1).bool() & ~things
        on_things = on_patches[things]
        things_share = float(on_things.sum())
        beside_share = float(on_patches[around].sum())
        self.rows += 1
        self.bos += bos
        self.things += things_share
        self.beside += beside_share
        self.elsewhere += 1.0 - bos - things_share - beside_share
        if on_things.numel() >= 2:
            self.spread += float(on_things.std() / on_things.mean())
            self.spread_rows += 1


@dataclass
class TallyReading:
    """The tally head's reading (training/grounding.GroundingLoss `tally_weight`) of every kind
    of thing with one true count, summed over rows and kinds: how many, the sum and the sum of
    squares of what it read (in things), and how many of those round to the truth. A later
    layer can only pick the asked kind's count out of a histogram that holds it."""

    kinds: int = 0
    total: float = 0.0
    squares: float = 0.0
    right: int = 0

    def add(self, read: torch.Tensor, truth: int) -> None:
        """`read`: the 1-D readings, in things, of kinds whose true count is `truth`."""
        self.kinds += read.numel()
        self.total += float(read.sum())
        self.squares += float((read.double() ** 2).sum())
        self.right += int((read.round() == truth).sum())


def _add_tally_readings(
    readings: dict[int, TallyReading],
    head_outputs: torch.Tensor,
    classes: torch.Tensor,
    head: int,
    head_dim: int,
) -> None:
    """`head_outputs`: (rows, heads x head_dim), o_proj's input at the tally rows; `classes`:
    (rows, P) tally class per patch."""
    from eval.testbed.patch_labels import TALLY_CLASSES
    from eval.testbed.training.grounding import TALLY_VALUE, tally_histograms

    channels = len(TALLY_CLASSES)
    start = head * head_dim
    per_thing = TALLY_VALUE / classes.shape[1]
    read = head_outputs[:, start : start + channels].float() / per_thing
    histograms = tally_histograms(classes, channels)
    for truth in histograms.unique().tolist():
        readings.setdefault(int(truth), TallyReading()).add(read[histograms == truth], int(truth))


def format_tally_readings(readings: dict[int, TallyReading]) -> str:
    """Markdown table per true count: kinds read, mean and standard deviation of the reading
    (in things), and the share that rounds to the truth."""
    lines = ["| things | kinds | mean read | sd | rounds right |", "|---:|---:|---:|---:|---:|"]
    for truth in sorted(readings):
        r = readings[truth]
        mean = r.total / r.kinds
        sd = math.sqrt(max(0.0, r.squares / r.kinds - mean * mean))
        lines.append(
            f"| {truth} | {r.kinds} | {mean:.2f} | {sd:.2f} | {100 * r.right / r.kinds:.1f} % |"
        )
    return "\n".join(lines)


def format_count_shares(count_shares: dict[int, CountAttention], sink_weight: float = 1.0) -> str:
    """Markdown table per number of things: rows, mean BOS share beside the share it was
    trained to, mean attention on the things, beside them and elsewhere, and the mean spread
    of the weights on the things."""
    lines = [
        "| things | rows | BOS share | target | on things | beside | elsewhere | spread |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(count_shares):
        tally = count_shares[n]
        rows = tally.rows
        spread = f"{tally.spread / tally.spread_rows:.2f}" if tally.spread_rows else "-"
        lines.append(
            f"| {n} | {rows} | {tally.bos / rows:.3f} | {sink_share_target(n, sink_weight):.3f} "
            f"| {tally.things / rows:.3f} | {tally.beside / rows:.3f} "
            f"| {tally.elsewhere / rows:.3f} | {spread} |"
        )
    return "\n".join(lines)


def format_option_ablation(ablation: dict[str, dict[str, float]]) -> str:
    """Markdown table: option head | multiple-choice questions | accuracy."""
    lines = ["| option head | questions | accuracy |", "|---|---:|---:|"]
    for mode, row in ablation.items():
        lines.append(f"| {mode} | {int(row['questions'])} | {100 * row['accuracy']:.1f} % |")
    return "\n".join(lines)


def format_report(report: dict[str, dict[str, float]]) -> str:
    lines = [
        "| supervision | layer | head | rows | loss | floor | attention on target |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report.items():
        on_target = "-" if row["floor"] > 0 else f"{100 * math.exp(-row['loss']):.1f} %"
        lines.append(
            f"| {name} | {int(row['layer'])} | {int(row['head'])} | {int(row['rows'])} | "
            f"{row['loss']:.3f} | {row['floor']:.3f} | {on_target} |"
        )
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.testbed.attention_report",
        description="Score a testbed model's heads against the supervised attention targets "
        "(training/grounding.SUPERVISIONS) on single-question turns.",
    )
    parser.add_argument(
        "--model",
        type=named_models.existing_folder_argument,
        required=True,
        help="a named model (reference) or a model folder",
    )
    parser.add_argument("--data", type=Path, required=True, help="testbed export root")
    parser.add_argument("--split", default="validation", help="split whose images are used")
    parser.add_argument("--images", type=int, default=200, help="use the first N images")
    parser.add_argument(
        "--grounding-layer", type=int, default=0, help="layer of the word-to-patch head"
    )
    parser.add_argument(
        "--readout-layer", type=int, default=-1, help="layer of the readout and option heads"
    )
    parser.add_argument(
        "--evidence-layer",
        type=int,
        default=-1,
        help="layer of the evidence, second and count heads (the reference recipe uses 1)",
    )
    parser.add_argument(
        "--count-head",
        type=int,
        default=None,
        help="head of --evidence-layer the count loss trained (testbed-train --count-head; "
        "default: the recipe's default)",
    )
    parser.add_argument(
        "--count-sink-weight",
        type=float,
        default=1.0,
        help="the BOS weight the count loss trained (testbed-train --count-sink-weight)",
    )
    parser.add_argument(
        "--neighbour-query",
        choices=NEIGHBOUR_QUERIES,
        default="last",
        help="the anchor word the neighbour loss trained (testbed-train --neighbour-query)",
    )
    parser.add_argument(
        "--count-shares",
        action="store_true",
        help="also print, per number of things to count, the count head's mean BOS share "
        "beside the share it was trained to, its attention on the things, beside them and "
        "elsewhere, and how unevenly it weighs the things",
    )
    parser.add_argument(
        "--tally",
        action="store_true",
        help="also print, per true count, how the tally head (testbed-train --tally-weight, "
        "head 0 of --evidence-layer) reads every kind of thing: mean and spread of its "
        "reading in things, and how often it rounds to the truth",
    )
    parser.add_argument(
        "--option-ablation",
        action="store_true",
        help="also score multiple-choice answers with the option head as trained, forced onto "
        "the right option word, and zeroed (does the answer read that head?)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from eval.testbed.model import load_reference
    from eval.testbed.training.train import SUPERVISION_FLAGS, load_examples

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, processor = load_reference(args.model)
    examples = list(load_examples(args.data, args.split))[: args.images]
    # the same --*-layer flags as eval.testbed.training.train, moving the same heads
    overrides = {
        name: getattr(args, layer_flag)
        for name, (_, layer_flag) in SUPERVISION_FLAGS.items()
        if layer_flag
    }
    count = {"sink_weight": args.count_sink_weight}
    if args.count_head is not None:
        count["head"] = args.count_head
    shares: dict[int, CountAttention] = {}
    readings: dict[int, TallyReading] | None = {} if args.tally else None
    report = attention_report(
        model,
        processor,
        examples,
        overrides,
        progress=not args.no_progress,
        supervision_overrides={"count": count},
        count_shares=shares,
        neighbour_query=args.neighbour_query,
        tally_readings=readings,
    )
    print(f"attention targets of {args.model} on {len(examples)} {args.split} images")
    print(format_report(report))
    if args.count_shares:
        print(format_count_shares(shares, args.count_sink_weight))
    if readings is not None:
        print(format_tally_readings(readings))
    if args.option_ablation:
        ablation = option_head_ablation(model, processor, examples, progress=not args.no_progress)
        print(format_option_ablation(ablation))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
