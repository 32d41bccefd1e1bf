"""Supervised attention for training the testbed reference model.

A two-layer LLM trained from scratch sits on the answer-prior plateau for thousands of steps:
nothing but the answer loss tells its attention which of 256 patches a question word is about,
and that signal only arrives once the rest of the circuit already works. The testbed's scene
metadata says which patches each colour, shape and digit word names, so one attention head of
the first layer is trained to put its mass there: `-log(attention mass on the named patches)`
for every grounded word, the word-region alignment objective of grounded pretraining (MDETR,
GLIP). `SUPERVISIONS` lays out the rest of a circuit two layers can run, each on its own head:
the position that predicts the answer gathers the question's words (first layer), then reads
the words back, the patches of the first and second thing named, the things to count, and the
right multiple-choice option (last layer). The targets come from train-split metadata only
(eval/testbed/patch_labels.attention_targets); they shape training, and inference is the
unchanged LLaVA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Supervision:
    """One supervised attention: which layer and head, at which positions (from the dataset's
    `<name>_positions`), onto what (`<name>_masks`: patch masks, or sequence-position masks).

    `uniform` spreads the head's attention evenly over the targets instead of only putting its
    mass there, and `sink` adds the sequence's first token (BOS) to every target set: attention
    spread evenly over n things and the sink gives the sink 1 / (n + 1), a count the head's
    output keeps (a softmax over the things alone would normalise it away). With `sink_weight`
    k the sink counts as k things and gets k / (n + k): large counts then lie further apart
    (8 and 9 things: 0.026 at k = 4, 0.011 at k = 1) and small ones closer together (1 and 2:
    0.13 against 0.17), where there is room. `coordinates` also asks the head's output to carry
    where its targets are, and `tally` how many things of each kind the image holds (see
    `GroundingLoss`).
    """

    name: str
    layer: int  # negative counts from the end
    head: int
    over_patches: bool
    uniform: bool = False
    sink: bool = False
    coordinates: bool = False
    sink_weight: float = 1.0
    tally: bool = False

    @property
    def positions_key(self) -> str:
        return f"{self.name}_positions"

    @property
    def masks_key(self) -> str:
        return f"{self.name}_masks"


# The circuit a two-layer LLM is shown (targets: eval/testbed/patch_labels.attention_targets).
SUPERVISIONS: dict[str, Supervision] = {
    s.name: s
    for s in (
        Supervision("grounding", 0, 0, over_patches=True),  # word -> its patches
        Supervision("question", 0, 1, over_patches=False),  # answer -> question words
        Supervision("letter", 0, 2, over_patches=False),  # option word -> its letter
        Supervision("question2", 0, 3, over_patches=False),  # answer -> the other words
        Supervision("readout", -1, 0, over_patches=False),  # answer -> question words
        Supervision("evidence", -1, 1, over_patches=True, coordinates=True),  # -> first thing
        Supervision("count", -1, 1, over_patches=True, uniform=True, sink=True),  # -> each one
        Supervision("second", -1, 2, over_patches=True, coordinates=True),  # -> second thing
        Supervision("option", -1, 3, over_patches=False),  # answer -> the right option word
        Supervision("neighbour", -2, 1, over_patches=True),  # anchor -> nearest/farthest one
        # answer -> every patch alike, reading a histogram of the things in the image
        Supervision("tally", -2, 0, over_patches=True, uniform=True, tally=True),
    )
}
POSITIONS_KEY = SUPERVISIONS["grounding"].positions_key
MASKS_KEY = SUPERVISIONS["grounding"].masks_key
# Which packed turn each token belongs to (0: BOS + image, -1: padding), when turns are isolated.
TURN_IDS_KEY = "turn_ids"
# (B, P): the tally class of every patch (eval/testbed/patch_labels.tally_classes, -1: none).
TALLY_KEY = "tally_classes"
# A thing's centre patch carries this much in its class's tally channel. Larger than the 1 of a
# plain indicator: the head reads a mean over P patches, and at the recipe's learning rate the
# value weights move enough each step to blur a count of small values (one thing is 1/P).
TALLY_VALUE = 16.0
IGNORE_INDEX = -100  # the label of a position that predicts nothing
# Batch entries for these losses only; the trainer takes them out before the model's forward.
SIDE_KEYS: tuple[str, ...] = (
    *(key for s in SUPERVISIONS.values() for key in (s.positions_key, s.masks_key)),
    TURN_IDS_KEY,
    TALLY_KEY,
)


def _turn_sees(query_turn: torch.Tensor, key_turn: torch.Tensor) -> torch.Tensor:
    """The shared prefix (turn 0) and the query's own turn; padding (-1) sees only padding."""
    return (key_turn == query_turn) | ((key_turn == 0) & (query_turn >= 0))


def turn_visibility(turn_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool, query x key: causal, and a token sees the shared prefix (turn 0) and its
    own turn only; padding (-1) sees only padding (never an empty row), and nothing sees it."""
    length = turn_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=turn_ids.device).tril()
    return causal[None] & _turn_sees(turn_ids[:, :, None], turn_ids[:, None, :])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class GroundingLoss:
    """Callable `(model, inputs, outputs) -> loss` for `TestbedTrainer(extra_losses=...)`.

    It reads the layer's input through a forward pre-hook and recomputes only the supervised
    heads' attention rows, so the model keeps its fast (sdpa) attention.

    With `coordinate_weight`, the first two channels of each supervised head's output (its
    attention-weighted values, before `o_proj`) must also give the row and column of the
    target's centre, scaled to [-1, 1] (squared error). A head that finds both objects of
    "where is A relative to B?" is not enough: the answer needs their positions as numbers
    that can be subtracted, and the answer loss alone did not put them there (a linear probe
    found the relation in under half of the held-out questions before the last layer).

    With `tally_weight` (a head spread evenly over every patch), the head's first channels must
    hold the image's histogram: each patch of tally class c (`TALLY_KEY`; one class per
    colour-and-shape and per digit, on each thing's centre patch) adds `TALLY_VALUE` / P to
    channel c (Huber error in things, summed over classes, times TALLY_VALUE / P), and each
    patch's own value must be TALLY_VALUE in its class's channel and 0 in the others (squared
    error in things, summed over the image's patches). A count
    read from a softmax share over the things and a sink needs the share to a hundredth for 7,
    8 or 9 things, and the count head never got there (eval/testbed/attention_report
    --count-shares); an even spread over a fixed set of patches has a fixed denominator, so
    the count is a sum the head's values carry and a later layer only has to pick the asked
    kind's channel.
    """

    def __init__(
        self,
        model: Any,
        weight: float,
        layer: int = 0,
        heads: int = 1,
        positions_key: str = POSITIONS_KEY,
        masks_key: str = MASKS_KEY,
        first_head: int = 0,
        over_patches: bool = True,
        uniform: bool = False,
        sink: bool = False,
        coordinate_weight: float = 0.0,
        sink_weight: float = 1.0,
        tally_weight: float = 0.0,
    ) -> None:
        language_model = model.model.language_model
        n_layers = len(language_model.layers)
        if -n_layers <= layer < 0:
            layer += n_layers
        if not 0 <= layer < n_layers:
            raise ValueError(f"grounding layer {layer} out of range: the LLM has {n_layers}")
        attention = language_model.layers[layer].self_attn
        n_heads = language_model.config.num_attention_heads
        if heads < 1 or first_head < 0 or first_head + heads > n_heads:
            raise ValueError(
                f"grounding heads {first_head}..{first_head + heads - 1} must lie in "
                f"0..{n_heads - 1}"
            )
        if language_model.config.num_key_value_heads != n_heads:
            raise ValueError("grounding supervision assumes one key head per query head")
        self.weight, self.layer = weight, layer
        self.heads = heads
        self.positions_key, self.masks_key = positions_key, masks_key
        self.first_head, self.over_patches = first_head, over_patches
        self.uniform, self.sink = uniform, sink
        if sink and not over_patches:
            raise ValueError("a sink target is for patch targets; add position 0 to the mask")
        if sink_weight != 1.0 and not (sink and uniform):
            raise ValueError("a sink weight needs a sink and a uniform target (the count loss)")
        if not sink_weight > 0:
            raise ValueError(f"the sink weight must be > 0, got {sink_weight}")
        self.sink_weight = sink_weight
        if coordinate_weight and not over_patches:
            raise ValueError("coordinates are those of patch targets; over_patches must be set")
        self.coordinate_weight = coordinate_weight
        self.tally_weight, self.tally_channels = tally_weight, 0
        if tally_weight:
            from eval.testbed.patch_labels import TALLY_CLASSES

            self.tally_channels = len(TALLY_CLASSES)
            if not over_patches:
                raise ValueError("a tally is read over patches; over_patches must be set")
            if self.tally_channels > attention.head_dim:
                raise ValueError(
                    f"a tally needs {self.tally_channels} channels of the head, which has "
                    f"{attention.head_dim}; use a larger LLM"
                )
        self.attention = attention
        self.image_token_id = model.config.image_token_id
        self.last_log_attention: torch.Tensor | None = None
        self._captured: dict[str, Any] = {}
        self._handle = attention.register_forward_pre_hook(self._capture, with_kwargs=True)

    @classmethod
    def for_supervision(
        cls,
        model: Any,
        supervision: Supervision,
        weight: float,
        layer: int,
        heads: int = 1,
        coordinate_weight: float = 0.0,
        tally_weight: float = 0.0,
    ) -> GroundingLoss:
        """The loss of one `SUPERVISIONS` entry, on `layer` (the recipe may move it);
        `coordinate_weight` applies to entries with `coordinates` only, `tally_weight` to
        those with `tally`."""
        return cls(
            model,
            weight,
            layer,
            heads,
            supervision.positions_key,
            supervision.masks_key,
            supervision.head,
            supervision.over_patches,
            supervision.uniform,
            supervision.sink,
            coordinate_weight if supervision.coordinates else 0.0,
            supervision.sink_weight,
            tally_weight if supervision.tally else 0.0,
        )

    def _capture(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self._captured = {"hidden": hidden, "rope": kwargs.get("position_embeddings")}

    def remove(self) -> None:
        self._handle.remove()

    def __call__(self, model: Any, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        positions = inputs[self.positions_key]  # (B, K), -1 = padding
        masks = inputs[self.masks_key]  # (B, K, P) over patch tokens, or (B, K, T) positions
        hidden, rope = self._captured.get("hidden"), self._captured.get("rope")
        if hidden is None or rope is None:
            raise RuntimeError("grounding loss: the attention layer did not run in this forward")
        rows, slots = (positions >= 0).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return hidden.new_zeros(())
        query_positions = positions[rows, slots]
        module, h = self.attention, self.heads
        d = module.head_dim
        supervised = slice(self.first_head, self.first_head + h)
        cos, sin = rope
        if cos.shape[0] == 1:
            cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)
        batch, length, _ = hidden.shape
        # Only the supervised heads' slices of the projections: the rest is not needed here.
        keys = _head_projection(module.k_proj, hidden, supervised, d).view(batch, length, h, d)
        keys = keys * cos[:, :, None] + _rotate_half(keys) * sin[:, :, None]
        query_hidden = hidden[rows, query_positions]  # (N, D)
        queries = _head_projection(module.q_proj, query_hidden, supervised, d).view(-1, h, d)
        q_cos, q_sin = cos[rows, query_positions][:, None], sin[rows, query_positions][:, None]
        queries = queries * q_cos + _rotate_half(queries) * q_sin
        scores = torch.einsum("nhd,nthd->nht", queries, keys[rows]) * module.scaling
        key_index = torch.arange(length, device=hidden.device)
        hidden_keys = key_index[None] > query_positions[:, None]  # (N, T)
        if TURN_IDS_KEY in inputs:  # isolated packed turns: other turns are out of sight
            turn_ids = inputs[TURN_IDS_KEY][rows]
            hidden_keys |= ~_turn_sees(turn_ids.gather(1, query_positions[:, None]), turn_ids)
        scores = scores.masked_fill(hidden_keys[:, None], -1e9)
        log_attention = scores.float().log_softmax(dim=-1)  # (N, h, T)
        # Kept for diagnostics (eval/testbed/attention_report reads the count head's BOS share).
        self.last_log_attention = log_attention.detach()
        target = masks[rows, slots][:, None]  # (N, 1, P or T)
        if self.over_patches:
            image_positions = image_token_positions(
                inputs["input_ids"], self.image_token_id
            )  # (B, P)
            log_attention_on = log_attention.gather(
                2, image_positions[rows][:, None].expand(-1, h, -1)
            )  # (N, h, P)
            if self.sink:
                log_attention_on = torch.cat((log_attention[..., :1], log_attention_on), dim=-1)
                target = F.pad(target, (1, 0), value=True)
        else:
            log_attention_on, target = log_attention, target[..., :length]
        if self.uniform:  # cross-entropy against the uniform distribution over the targets
            share = target.to(log_attention_on.dtype)  # (N, 1, P [+ 1]), each target counts 1
            if self.sink:
                share = torch.cat((share[..., :1] * self.sink_weight, share[..., 1:]), dim=-1)
            total = (log_attention_on.masked_fill(~target, 0.0) * share).sum(dim=-1)
            loss = -self.weight * (total / share.sum(dim=-1).clamp_min(1)).mean()
        else:
            masked = log_attention_on.masked_fill(~target, float("-inf"))
            log_mass = masked.logsumexp(dim=-1)  # log of the attention mass on the targets
            loss = -self.weight * log_mass.mean()
        if self.coordinate_weight or self.tally_weight:
            values = _head_projection(module.v_proj, hidden, supervised, d).view(
                batch, length, h, d
            )
            # the head's output before o_proj: (N, h, d)
            read = torch.einsum("nht,nthd->nhd", log_attention.exp().to(values.dtype), values[rows])
        if self.coordinate_weight:
            centres = patch_centres(masks[rows, slots]).to(read.dtype)  # (N, 2)
            error = (read[..., :2] - centres[:, None]).float().pow(2).sum(dim=-1)
            loss = loss + self.coordinate_weight * error.mean()
        if self.tally_weight:
            if TALLY_KEY not in inputs:
                raise RuntimeError(
                    f"tally loss: the batch has no {TALLY_KEY!r}; it needs patch labels (a "
                    "grounded testbed dataset)"
                )
            histograms = tally_histograms(inputs[TALLY_KEY][rows], self.tally_channels)
            per_thing = TALLY_VALUE / inputs[TALLY_KEY].shape[1]  # what one thing adds
            tallied = read[..., : self.tally_channels].float() / per_thing  # (N, h, C)
            # Huber in things (quadratic within one thing, linear beyond) times what one
            # thing adds: the division that turns a mean into a count would otherwise
            # multiply its gradient on the layers below, shared with every other loss (an
            # untrained head's error is hundreds of things; clipping then starved the rest)
            target = histograms[:, None].expand_as(tallied)
            error = F.smooth_l1_loss(tallied, target, reduction="none").sum(dim=-1) * per_thing
            # and every patch's own value: TALLY_VALUE in its class's channel, 0 elsewhere
            # (squared error in things). From the sum alone the value weights see only the
            # mean of all patches, where one thing is 1/P of the signal: in a from-scratch run
            # a centre patch still carried 0.03 things of its own class after 400 steps, and
            # the patches around it 0.5 in all (the head read about 1 whatever the count).
            image_at = image_token_positions(inputs["input_ids"], self.image_token_id)
            per_patch = values[torch.arange(batch)[:, None], image_at][..., : self.tally_channels]
            classes = inputs[TALLY_KEY]
            one_hot = F.one_hot(classes + 1, self.tally_channels + 1)[..., 1:]  # -1: all zero
            # summed over an image's patches: a mean over them let the few centre patches
            # stay at 0.02 things (runs/ref21, step 200) while the rest were held at 0
            wrong = (per_patch.float() / TALLY_VALUE - one_hot[:, :, None]).pow(2).sum(dim=-1)
            loss = loss + self.tally_weight * (error.mean() + wrong.sum(dim=1).mean())
        return loss


class EarlyAnswerLoss:
    """Callable `(model, inputs, outputs) -> loss` for `TestbedTrainer(extra_losses=...)`: the
    LM head, read off the residual stream after `layer` at each position that predicts an
    answer, must already give the answer word. For a multiple-choice question (an `option`
    supervision row at that position) the target is the right option's word, not its letter.

    A multiple-choice answer is a lookup in the last layer: the answer position finds the option
    word that is right (`SUPERVISIONS["option"]`), and a query can only match what the residual
    already holds. A model trained without this loss chose options largely by position (it
    answered "a" to 9 % of the multiple-choice test questions, where "a" was right for 25 %),
    and scored 42 % on multiple-choice colour questions against 100 % on the open ones.
    """

    def __init__(
        self,
        model: Any,
        weight: float,
        layer: int = -2,
        option_positions_key: str = SUPERVISIONS["option"].positions_key,
        option_masks_key: str = SUPERVISIONS["option"].masks_key,
    ) -> None:
        language_model = model.model.language_model
        n_layers = len(language_model.layers)
        index = layer + n_layers if layer < 0 else layer
        if not 0 <= index < n_layers - 1:
            raise ValueError(
                f"early-answer layer {layer}: must be a layer before the last of the LLM's "
                f"{n_layers} (0..{n_layers - 2}, or -{n_layers}..-2)"
            )
        self.weight, self.layer = weight, index
        self.option_positions_key, self.option_masks_key = option_positions_key, option_masks_key
        self.final_norm, self.lm_head = language_model.norm, model.lm_head
        self._captured: torch.Tensor | None = None
        self._handle = language_model.layers[index].register_forward_hook(self._capture)

    def _capture(self, module: Any, args: tuple, output: Any) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output

    def remove(self) -> None:
        self._handle.remove()

    def targets(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, positions, token ids): every position whose next label starts an answer,
        and the word it must already give there."""
        if "labels" not in inputs:
            raise RuntimeError("early-answer loss: the batch has no labels")
        labels = inputs["labels"]
        starts = (labels[:, :-1] == IGNORE_INDEX) & (labels[:, 1:] != IGNORE_INDEX)
        rows, positions = starts.nonzero(as_tuple=True)
        tokens = labels[rows, positions + 1].clone()
        if self.option_positions_key not in inputs or rows.numel() == 0:
            return rows, positions, tokens
        option_rows, asked_at, word_at = position_targets(
            inputs, self.option_positions_key, self.option_masks_key
        )
        if option_rows.numel():
            words = inputs["input_ids"][option_rows, word_at]
            same = (rows[:, None] == option_rows[None]) & (positions[:, None] == asked_at[None])
            tokens = torch.where(same.any(dim=1), words[same.float().argmax(dim=1)], tokens)
        return rows, positions, tokens

    def __call__(self, model: Any, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        hidden = self._captured
        if hidden is None:
            raise RuntimeError("early-answer loss: the LLM layer did not run in this forward")
        rows, positions, tokens = self.targets(inputs)
        if rows.numel() == 0:
            return hidden.new_zeros(())
        logits = self.lm_head(self.final_norm(hidden[rows, positions]))
        return self.weight * F.cross_entropy(logits.float(), tokens)


def position_targets(
    inputs: dict[str, Any], positions_key: str, masks_key: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, query positions, target positions) of a supervision over sequence positions whose
    every row names one target (the right option word, an option's letter); padding dropped."""
    positions = inputs[positions_key]
    rows, slots = (positions >= 0).nonzero(as_tuple=True)
    targets = inputs[masks_key][rows, slots].float().argmax(dim=-1)
    return rows, positions[rows, slots], targets


def _option_head_attention(model: Any, layer: int, head: int) -> Any:
    """The attention module holding the option head, after checking that the head exists."""
    language_model = model.model.language_model
    n_layers = len(language_model.layers)
    index = layer + n_layers if layer < 0 else layer
    if not 0 <= index < n_layers:
        raise ValueError(f"option head layer {layer} out of range: the LLM has {n_layers}")
    n_heads = language_model.config.num_attention_heads
    if not 0 <= head < n_heads:
        raise ValueError(f"option head {head} must lie in 0..{n_heads - 1}")
    if language_model.config.num_key_value_heads != n_heads:
        raise ValueError("the option head's value is read per head: one key head per query head")
    return language_model.layers[index].self_attn


class OptionHeadForcing:
    """Teacher forcing for the option head, not a loss: while `prepare(inputs)` is in effect,
    at each position that answers a multiple-choice question the head's output (the input of
    `o_proj`) is the value of the right option word, as if its attention there were one-hot.

    The option head's own loss (`SUPERVISIONS["option"]`) only shapes where it looks. A model
    trained with it put 54 % of that head's attention on the right option word, yet its answers
    did not use the head: with its output zeroed, multiple-choice validation went 43 -> 40 %,
    and with it forced onto the right option, 43 -> 43 %. The answer loss never saw a reliable
    head to learn to read. Forcing it in training gives the answer loss one, so the letter gets
    carried through the option word's value and read out through `o_proj`; inference is the
    unchanged model, with the head's own attention. With `zero` the head's output is zeroed
    there instead (the ablation of eval/testbed/attention_report).
    """

    def __init__(
        self,
        model: Any,
        layer: int = SUPERVISIONS["option"].layer,
        head: int = SUPERVISIONS["option"].head,
        positions_key: str = SUPERVISIONS["option"].positions_key,
        masks_key: str = SUPERVISIONS["option"].masks_key,
        zero: bool = False,
    ) -> None:
        attention = _option_head_attention(model, layer, head)
        self.attention, self.head, self.zero = attention, head, zero
        self.positions_key, self.masks_key = positions_key, masks_key
        self._hidden: torch.Tensor | None = None
        self._forced: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._handles = (
            attention.register_forward_pre_hook(self._capture, with_kwargs=True),
            attention.o_proj.register_forward_pre_hook(self._force),
        )

    def prepare(self, inputs: dict[str, Any]) -> None:
        """Force the next forward at the batch's multiple-choice answer positions."""
        if self.positions_key not in inputs:
            raise RuntimeError(
                f"option head forcing: the batch has no {self.positions_key!r}; it needs the "
                "option supervision's targets (--option-weight > 0 on testbed data)"
            )
        forced = position_targets(inputs, self.positions_key, self.masks_key)
        self._forced = forced if forced[0].numel() else None

    def release(self) -> None:
        self._forced, self._hidden = None, None

    def remove(self) -> None:
        self.release()
        for handle in self._handles:
            handle.remove()

    def _capture(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._forced is not None:
            self._hidden = kwargs.get("hidden_states", args[0] if args else None)

    def _force(self, module: Any, args: tuple) -> tuple | None:
        if self._forced is None or self._hidden is None:
            return None
        rows, answer_at, word_at = self._forced
        d = self.attention.head_dim
        values = _head_projection(
            self.attention.v_proj, self._hidden[rows, word_at], slice(self.head, self.head + 1), d
        )
        if self.zero:
            values = torch.zeros_like(values)
        head_outputs = args[0].clone()
        columns = slice(self.head * d, (self.head + 1) * d)
        head_outputs[rows, answer_at, columns] = values.to(head_outputs.dtype)
        return (head_outputs, *args[1:])


class OptionLetterLoss:
    """Callable `(model, inputs, outputs) -> loss` for `TestbedTrainer(extra_losses=...)`: the
    option head's value at every multiple-choice option word, through that head's slice of
    `o_proj`, the final norm and the LM head, must give the option's letter (cross-entropy).

    A multiple-choice answer is the letter of the option the option head finds, so the head's
    value must carry the letter. The letter is in the residual there (a linear probe names it
    on every option word), but the answer loss alone never built the path: it is a product of
    two matrices that starts with no letter in it, and under the recipe's learning rate and
    other losses it stayed on that plateau (the head's value gave a, b, c and d the same logits
    whichever option it was). This loss trains the path on its own, four options per question.
    """

    def __init__(
        self,
        model: Any,
        weight: float,
        layer: int = SUPERVISIONS["option"].layer,
        head: int = SUPERVISIONS["option"].head,
        positions_key: str = SUPERVISIONS["letter"].positions_key,
        masks_key: str = SUPERVISIONS["letter"].masks_key,
    ) -> None:
        language_model = model.model.language_model
        self.weight, self.head = weight, head
        self.positions_key, self.masks_key = positions_key, masks_key
        self.attention = _option_head_attention(model, layer, head)
        self.final_norm, self.lm_head = language_model.norm, model.lm_head
        self._hidden: torch.Tensor | None = None
        self._handle = self.attention.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        self._hidden = kwargs.get("hidden_states", args[0] if args else None)

    def remove(self) -> None:
        self._handle.remove()

    def __call__(self, model: Any, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        if self.positions_key not in inputs:
            raise RuntimeError(
                f"option letter loss: the batch has no {self.positions_key!r}; it needs the letter "
                "supervision's targets (--letter-weight > 0 on testbed data)"
            )
        hidden = self._hidden
        if hidden is None:
            raise RuntimeError(
                "option letter loss: the attention layer did not run in this forward"
            )
        rows, words, letters = position_targets(inputs, self.positions_key, self.masks_key)
        if rows.numel() == 0:
            return hidden.new_zeros(())
        d = self.attention.head_dim
        columns = slice(self.head * d, (self.head + 1) * d)
        values = _head_projection(
            self.attention.v_proj, hidden[rows, words], slice(self.head, self.head + 1), d
        )
        read = F.linear(values, self.attention.o_proj.weight[:, columns])
        logits = self.lm_head(self.final_norm(read))
        return self.weight * F.cross_entropy(logits.float(), inputs["input_ids"][rows, letters])


def tally_histograms(classes: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, P) tally class per patch (-1: none) -> (N, channels) float count of each class."""
    counts = torch.zeros(classes.shape[0], channels + 1, device=classes.device)
    slots = torch.where(classes >= 0, classes, channels)  # -1 -> a spare last column
    counts.scatter_add_(1, slots, torch.ones_like(slots, dtype=counts.dtype))
    return counts[:, :channels]


def patch_centres(masks: torch.Tensor) -> torch.Tensor:
    """(N, P) square-grid patch masks -> (N, 2) row and column of each mask's centre, scaled so
    the grid spans [-1, 1] (an empty mask gives the grid's centre, 0)."""
    grid = math.isqrt(masks.shape[-1])
    if grid * grid != masks.shape[-1]:
        raise ValueError(f"patch masks must cover a square grid, got {masks.shape[-1]} patches")
    index = torch.arange(masks.shape[-1], device=masks.device)
    scale = 2.0 / max(1, grid - 1)
    rows = (index // grid).float() * scale - 1.0
    columns = (index % grid).float() * scale - 1.0
    weights = masks.float()
    total = weights.sum(dim=-1).clamp_min(1.0)
    return torch.stack((weights @ rows, weights @ columns), dim=-1) / total[:, None]


def _head_projection(
    linear: torch.nn.Linear, hidden: torch.Tensor, heads: slice, head_dim: int
) -> torch.Tensor:
    rows = slice(heads.start * head_dim, heads.stop * head_dim)
    bias = None if linear.bias is None else linear.bias[rows]
    return F.linear(hidden, linear.weight[rows], bias)


def image_token_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B, P): where each sequence's P image tokens sit, so per-patch targets line up with
    attention over the whole sequence."""
    is_image = input_ids == image_token_id
    counts = is_image.sum(dim=1)
    if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        raise ValueError("grounding loss needs exactly one image (same token count) per sequence")
    return is_image.nonzero(as_tuple=True)[1].view(input_ids.shape[0], -1)


__all__ = [
    "MASKS_KEY",
    "POSITIONS_KEY",
    "SIDE_KEYS",
    "SUPERVISIONS",
    "TALLY_KEY",
    "TALLY_VALUE",
    "TURN_IDS_KEY",
    "EarlyAnswerLoss",
    "GroundingLoss",
    "image_token_positions",
    "OptionHeadForcing",
    "OptionLetterLoss",
    "position_targets",
    "patch_centres",
    "tally_histograms",
    "Supervision",
    "turn_visibility",
]
