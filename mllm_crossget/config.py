"""One configuration object for every CrossGET option, with validation and a JSON round trip."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .merge import HUB_GUARDS
from .peers import MERGING_METHODS, METHOD_NAMES
from .peers.tome import TOME_SETTINGS
from .schedule import SCHEDULE_MODES

__all__ = [
    "CONFIG_NAME",
    "CrossGETConfig",
    "GUIDANCE_MODES",
    "IMPORTANCE_NORMS",
    "LLM_POSITION_MODES",
    "MATCHING_MODES",
]

CONFIG_NAME = "crossget_config.json"


def budget_error(value: object, where: str = "visual_tokens") -> str:
    """The one message for a budget that is not an int >= 1 (0 included), everywhere: the
    config, ``crossget.budget``, ``crossget chat``'s ``/budget`` and ``crossget serve``."""
    return (
        f"{where} must be an int >= 1, got {value!r}: a budget is visual tokens per image "
        "(0 does not mean full); for CrossGET off use 'full' in crossget chat (/budget full) "
        'and crossget serve ("visual_tokens": "full"), crossget.remove(model, processor) in '
        "Python"
    )


GUIDANCE_MODES: tuple[str, ...] = ("cross", "attention", "query", "text", "none")
IMPORTANCE_NORMS: tuple[str, ...] = ("raw", "standard")
LLM_POSITION_MODES: tuple[str, ...] = ("original", "compact")
MATCHING_MODES: tuple[str, ...] = ("complete_graph", "bipartite")


@dataclass
class CrossGETConfig:
    """Everything that decides how an encoder merges tokens.

    Exactly one budget is given: ``visual_tokens`` (tokens reaching the LLM per image),
    ``keep_ratio`` (fraction of patch tokens kept) or ``r`` (tokens removed per merging layer,
    an int for the authors' constant schedule or one int per layer).
    """

    visual_tokens: int | None = field(
        default=None, metadata={"help": "Exact number of visual tokens per image after merging."}
    )
    keep_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of patch tokens to keep, in (0, 1]."}
    )
    r: int | list[int] | None = field(
        default=None,
        metadata={
            "help": "Tokens merged per layer: an int (constant) or one int per layer. A layer "
            "merges at most half of its unprotected tokens: a larger r is clamped to that, and "
            "crossget.apply warns (UserWarning) with the visual tokens that result."
        },
    )
    schedule: Literal["even", "front", "decreasing", "geometric"] = field(
        default="even",
        metadata={
            "help": "How a visual_tokens/keep_ratio budget is spread over the layers: even = "
            "equal counts; front = as early as allowed; decreasing = linearly fewer later; "
            "geometric = the same fraction of the tokens in every layer (no layer merges a "
            "large share)."
        },
    )
    matching: Literal["complete_graph", "bipartite"] = field(
        default="complete_graph",
        metadata={"help": "complete_graph = CrossGET's CGSM; bipartite = ToMe (peer baseline)."},
    )
    guidance: Literal["cross", "attention", "query", "text", "none"] = field(
        default="cross",
        metadata={
            "help": "Importance source: cross = learnable cross token's attention row (SDPA "
            "ok); attention = mean attention received + cross row (needs eager); query = the "
            "prompt conditions the cross token; text = training-free relevance of each token "
            "to its own prompt (LLaVA: cosine of the projected token to the prompt's input "
            "embeddings); none = no importance (plain similarity)."
        },
    )
    importance_norm: Literal["raw", "standard"] = field(
        default="raw",
        metadata={
            "help": "How importance enters the matching score: raw = added as is (the "
            "authors' form; a ~1/N attention row); standard = standardised per image over "
            "the mergeable tokens (zero mean, unit deviation), times importance_weight. The "
            "ensemble weights always use the raw importance (guidance='text': none)."
        },
    )
    importance_weight: float = field(
        default=1.0,
        metadata={
            "help": "Coefficient of the importance in the matching score (raw: multiplies "
            "the raw row; standard: multiplies the standardised row). 0 = similarity only."
        },
    )
    max_sources_per_destination: int | None = field(
        default=None,
        metadata={
            "help": "Hub guard for complete_graph matching: the most sources one destination "
            "absorbs in one layer (extra sources move to their next most similar destination "
            "with room; token counts unchanged). None = no cap (the authors' rule). "
            "Bipartite (ToMe) matching ignores it."
        },
    )
    hub_guard: Literal["defer", "rematch"] = field(
        default="defer",
        metadata={
            "help": "What the hub guard does with a source beyond a destination's cap: defer = "
            "it is not merged this layer and the next candidate by score goes instead; "
            "rematch = it merges into its next most similar destination with room."
        },
    )
    proportional_attention: bool = field(
        default=True, metadata={"help": "Add log(token size) to attention logits."}
    )
    cross_token_attended: bool = field(
        default=False,
        metadata={
            "help": "The image tokens attend to the vision cross token as a key (a full member "
            "of the attention, as in the authors' code; its size is 1, so proportional "
            "attention adds log(1) = 0); it is still never merged. False = it only reads (its "
            "key masked): training-free it is exactly CLS, and the LM loss reaches the vision "
            "prompts P only through the ensemble weights. Needs a cross-token guidance "
            "(cross, attention, query); the cross token then runs even when nothing merges."
        },
    )
    cross_token_to_llm: bool = field(
        default=False,
        metadata={
            "help": "LLaVA-1.5: hand the vision cross token's final state to the LLM as one "
            "extra visual token per image, after the image tokens (through the projector). A "
            "visual_tokens budget counts it (the LLM still receives exactly K tokens per "
            "image: K - 1 image tokens and the cross token). Needs a cross-token guidance."
        },
    )
    llm_proportional_attention: bool | None = field(
        default=None,
        metadata={
            "help": "Proportional attention inside the LLM as well: every visual token's key "
            "gets + log(size), size = the patches it stands for, so the LLM weighs a merged "
            "token as that many copies of itself (training-free). None = on where it applies "
            "(LLaVA-1.5 with sdpa or eager LLM attention, any method that reduces before the "
            "LLM: kept patches weigh 1, merged or pooled tokens their members), True = on or "
            "an error saying why not, False = off."
        },
    )
    first_merge_layer: int = field(
        default=0, metadata={"help": "Index of the first encoder layer allowed to merge."}
    )
    text_cross_tokens: bool = field(
        default=True,
        metadata={"help": "Learnable text cross token at the LLM's first position (training)."},
    )
    alignment_weight: float = field(
        default=0.001,
        metadata={"help": "lambda of the cross-token JS alignment loss (0.001 for 7B, 0.1 13B)."},
    )
    track_source: bool = field(
        default=False, metadata={"help": "Keep a patch->token map for visualising merges."}
    )
    text_r: int | None = field(
        default=None,
        metadata={
            "help": "CLIP two-tower models: tokens merged per text-encoder layer (EOT and "
            "padding never merge); None or 0 leaves the text tower unchanged."
        },
    )
    method: str = field(
        default="crossget",
        metadata={
            "help": "Token-reduction method: crossget, or a peer measured behind the same "
            "budget API: tome, visionzip, divprune, pool, random, fastv (mllm_crossget.peers). "
            "Case-insensitive: stored lower-case."
        },
    )
    fastv_layer: int = field(
        default=2,
        metadata={
            "help": "fastv and llm_keep_ratio: LLM layer from which only the kept visual "
            "tokens remain (K=2); the layer before ranks them."
        },
    )
    llm_keep_ratio: float | None = field(
        default=None,
        metadata={
            "help": "LLaVA-1.5, every method that reduces before the LLM: a second, "
            "text-guided stage inside the LLM. From LLM layer fastv_layer on, each image keeps "
            "this fraction (rounded, at least 1) of the visual tokens it reached the LLM "
            "with, ranked by the attention of the prompt's last token in the layer before "
            "(FastV's ranking, with the token sizes' bias), so the question picks which "
            "reduced tokens the deeper layers read. None = off (every LLM layer reads every "
            "visual token)."
        },
    )
    seed: int = field(default=0, metadata={"help": "random: seed of the kept patch positions."})
    llm_positions: Literal["original", "compact"] = field(
        default="original",
        metadata={
            "help": "LLaVA: rotary positions of the reduced visual tokens in the LLM. original = "
            "each token sits where its first patch sat and text keeps its distance to the "
            "image, as in the unreduced prompt; compact = consecutive positions (the "
            "authors' code). Every encoder-side method follows it; FastV keeps its own."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            self.method = self.method.strip().lower()  # "ToMe", "CrossGET" name the same method
        if self.method == "tome":
            # ToMe = CrossGET's merging adapter with bipartite matching and no importance.
            if self.matching == "complete_graph":
                self.matching = TOME_SETTINGS["matching"]
            if self.guidance == "cross":
                self.guidance = TOME_SETTINGS["guidance"]
        self.validate()

    def validate(self) -> None:
        # The method first: its name decides what the other fields mean.
        if self.method not in METHOD_NAMES:
            raise ValueError(
                f"method must be one of {', '.join(METHOD_NAMES)}, got {self.method!r}"
            )
        budgets = [
            name for name in ("visual_tokens", "keep_ratio", "r") if getattr(self, name) is not None
        ]
        if len(budgets) > 1:
            raise ValueError(
                f"give exactly one budget, got {budgets}; e.g. CrossGETConfig(visual_tokens=144)"
            )
        if not budgets:
            raise ValueError(
                "no budget given: set visual_tokens=K, keep_ratio=0.25 or r=13 "
                "(the authors' LLaVA-1.5 setting)"
            )
        if self.visual_tokens is not None and (
            not isinstance(self.visual_tokens, int)
            or isinstance(self.visual_tokens, bool)  # True is an int to Python, not a budget
            or self.visual_tokens < 1
        ):
            raise ValueError(budget_error(self.visual_tokens))
        if self.keep_ratio is not None and (
            isinstance(self.keep_ratio, bool)
            or not isinstance(self.keep_ratio, (int, float))
            or not 0.0 < self.keep_ratio <= 1.0
        ):
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.r is not None:
            values = [self.r] if isinstance(self.r, int) else list(self.r)
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
                raise ValueError(f"r must be a non-negative int or a list of them, got {self.r!r}")
        if self.schedule not in SCHEDULE_MODES:
            raise ValueError(f"schedule must be one of {SCHEDULE_MODES}, got {self.schedule!r}")
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {self.guidance!r}")
        if self.matching not in MATCHING_MODES:
            raise ValueError(f"matching must be one of {MATCHING_MODES}, got {self.matching!r}")
        if self.importance_norm not in IMPORTANCE_NORMS:
            raise ValueError(
                f"importance_norm must be one of {IMPORTANCE_NORMS}, got {self.importance_norm!r}"
            )
        if (
            isinstance(self.importance_weight, bool)
            or not isinstance(self.importance_weight, int | float)
            or not math.isfinite(self.importance_weight)
            or self.importance_weight < 0
        ):
            raise ValueError(
                f"importance_weight must be a finite number >= 0, got {self.importance_weight!r}"
            )
        if self.hub_guard not in HUB_GUARDS:
            raise ValueError(f"hub_guard must be one of {HUB_GUARDS}, got {self.hub_guard!r}")
        cap = self.max_sources_per_destination
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise ValueError(
                f"max_sources_per_destination must be an int >= 1 or None (no cap), got {cap!r}"
            )
        if self.matching == "bipartite" and self.guidance not in ("none", "cross"):
            raise ValueError("bipartite (ToMe) matching takes no importance; use guidance='none'")
        for name in ("cross_token_attended", "cross_token_to_llm"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
            if value and not self.uses_cross_token:
                raise ValueError(
                    f"{name}=True needs the vision cross token: method='crossget' with guidance "
                    f"'cross', 'attention' or 'query' (got method={self.method!r}, "
                    f"guidance={self.guidance!r}); set {name}=False or change the guidance"
                )
        if self.llm_proportional_attention not in (None, True, False):
            raise ValueError(
                "llm_proportional_attention must be None (where it applies), True or False, got "
                f"{self.llm_proportional_attention!r}"
            )
        if self.llm_proportional_attention and self.method == "fastv":
            raise ValueError(
                "llm_proportional_attention weighs tokens reduced before the LLM by the patches "
                "they hold; FastV prunes inside the LLM and merges nothing: leave "
                "llm_proportional_attention at None or False for method='fastv'"
            )
        if self.first_merge_layer < 0:
            raise ValueError(f"first_merge_layer must be >= 0, got {self.first_merge_layer}")
        if self.alignment_weight < 0:
            raise ValueError(f"alignment_weight must be >= 0, got {self.alignment_weight}")
        if self.text_r is not None and (
            not isinstance(self.text_r, int) or isinstance(self.text_r, bool) or self.text_r < 0
        ):
            raise ValueError(f"text_r must be a non-negative int or None, got {self.text_r!r}")
        if self.method == "tome" and (self.matching, self.guidance) != ("bipartite", "none"):
            raise ValueError(
                "method='tome' is bipartite matching without guidance; drop matching/guidance"
            )
        if self.method not in MERGING_METHODS and self.r is not None:
            raise ValueError(
                f"r (tokens merged per encoder layer) applies to the merging methods "
                f"{MERGING_METHODS}; give method={self.method!r} visual_tokens=K or keep_ratio"
            )
        if self.llm_positions not in LLM_POSITION_MODES:
            raise ValueError(
                f"llm_positions must be one of {LLM_POSITION_MODES}, got {self.llm_positions!r}"
            )
        if self.fastv_layer < 1:
            raise ValueError(f"fastv_layer must be >= 1, got {self.fastv_layer}")
        ratio = self.llm_keep_ratio
        if ratio is not None:
            if (
                isinstance(ratio, bool)
                or not isinstance(ratio, int | float)
                or not 0.0 < ratio <= 1.0
            ):
                raise ValueError(f"llm_keep_ratio must be in (0, 1] or None, got {ratio!r}")
            if self.method == "fastv":
                raise ValueError(
                    "llm_keep_ratio adds FastV's in-LLM stage after a reduction before the LLM; "
                    "method='fastv' already prunes in the LLM by its budget: leave "
                    "llm_keep_ratio at None"
                )

    @property
    def merges_in_encoder(self) -> bool:
        """CrossGET and ToMe merge inside the vision encoder; the other peers do not."""
        return self.method in MERGING_METHODS

    @property
    def prunes_in_llm(self) -> bool:
        """FastV, or the ``llm_keep_ratio`` stage: visual tokens dropped from LLM layer
        ``fastv_layer`` on (peers/fastv.py's hooks)."""
        return self.method == "fastv" or self.llm_keep_ratio is not None

    @property
    def uses_cross_token(self) -> bool:
        return self.merges_in_encoder and self.guidance in ("cross", "attention", "query")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CrossGETConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CrossGET config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``crossget_config.json`` atomically (a crash never leaves half a file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / CONFIG_NAME
        atomic_write_text(target, self.to_json_string())
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> CrossGETConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in {directory}; save one with config.save_pretrained(dir) or "
                "crossget.save_pretrained(model, dir)"
            )
        return cls.from_dict(json.loads(path.read_text()))


@contextlib.contextmanager
def atomic_output(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to; when the block succeeds it replaces
    ``path`` in one ``os.replace`` (so a reader or a crash never sees half a file), and it is
    removed when the block fails. ``suffix`` keeps the extension writers such as savefig read.
    The project's one way to write a file atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def replace_folder(finished: Path, target: Path) -> None:
    """Put the finished folder ``finished`` at ``target``: a reader sees the old folder or the
    new one, never a half-written one. ``os.replace`` cannot replace a non-empty folder, so the
    old one is renamed aside to ``.NAME.old`` first (one a killed swap left there is deleted
    before) and deleted after. The project's one way to swap a folder in."""
    finished, target = Path(finished), Path(target)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(finished, target)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 ``text`` into ``path`` through atomic_output, synced to disk before the rename."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(path: Path, payload: object, indent: int = 2) -> None:
    """``payload`` as indented JSON through atomic_write_text, creating the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=indent) + "\n")
