"""Turns a config (or a per-call budget) and an image size into an exact per-layer plan."""

from __future__ import annotations

from dataclasses import dataclass

from .adapters.vit_layer import EncoderPlan
from .config import CrossGETConfig
from .schedule import (
    constant_schedule,
    max_removable,
    schedule_for_ratio,
    schedule_for_tokens,
)

__all__ = ["TowerPlanner"]


@dataclass(frozen=True)
class TowerPlanner:
    """Plans merging for one vision tower.

    ``layers_run`` is how many encoder layers produce the used features (LLaVA: up to
    ``vision_feature_layer``); ``dropped_tokens`` is how many leading tokens of the encoder
    output do not count as visual tokens (1 when LLaVA drops CLS, else 0).  CLS is the only
    protected token (the cross token lives outside the sequence).  With
    ``config.cross_token_to_llm`` the LLM also receives the cross token after each image's
    tokens: every visual-token count here includes it (:attr:`extra_tokens`), and a
    ``visual_tokens`` budget K merges down to K - 1 image tokens.
    """

    config: CrossGETConfig
    patch_size: int
    layers_run: int
    dropped_tokens: int = 1
    num_protected: int = 1

    @property
    def extra_tokens(self) -> int:
        """Visual tokens per image beyond the encoder's (1: the cross token, handed over)."""
        return 1 if self.config.cross_token_to_llm and self.config.uses_cross_token else 0

    @property
    def merge_layers(self) -> int:
        return max(self.layers_run - self.config.first_merge_layer, 0)

    def input_tokens(self, height: int, width: int) -> int:
        return (height // self.patch_size) * (width // self.patch_size) + self.num_protected

    def visual_range(self, num_tokens: int) -> tuple[int, int]:
        """Smallest and largest reachable visual-token counts for this tower."""
        floor = num_tokens - max_removable(num_tokens, self.merge_layers, self.num_protected)
        shift = self.extra_tokens - self.dropped_tokens
        return max(floor + shift, 1), num_tokens + shift

    def layer_r(self, num_tokens: int, visual_tokens: int | None = None) -> tuple[int, ...]:
        config = self.config
        if not config.merges_in_encoder:
            return (0,) * self.layers_run  # peers (mllm_crossget.peers): the tower runs unmerged
        lead = (0,) * (self.layers_run - self.merge_layers)
        if visual_tokens is None and config.visual_tokens is not None:
            visual_tokens = config.visual_tokens
        if visual_tokens is not None:
            low, high = self.visual_range(num_tokens)
            if not 1 <= visual_tokens <= high:
                raise ValueError(
                    f"visual_tokens={visual_tokens} is outside [1, {high}]: this tower yields "
                    f"{high} visual tokens per image before merging"
                )
            if visual_tokens < low or visual_tokens - self.extra_tokens + self.dropped_tokens < 1:
                cross = " (one of them the cross token)" if self.extra_tokens else ""
                raise ValueError(
                    f"visual_tokens={visual_tokens} is impossible: {self.merge_layers} merging "
                    f"layers can reach at least {low} visual tokens{cross} (each layer merges "
                    f"at most half of the tokens); choose visual_tokens in [{low}, {high}] or "
                    "lower first_merge_layer"
                )
            target = visual_tokens - self.extra_tokens + self.dropped_tokens
            return lead + schedule_for_tokens(
                num_tokens, target, self.merge_layers, self.num_protected, config.schedule
            )
        if config.keep_ratio is not None:
            return lead + schedule_for_ratio(
                num_tokens,
                config.keep_ratio,
                self.merge_layers,
                self.num_protected,
                config.schedule,
            )
        if isinstance(config.r, int):
            return lead + constant_schedule(config.r, self.merge_layers)
        values = tuple(config.r or ())
        if len(values) != self.merge_layers:
            raise ValueError(
                f"an explicit r schedule needs one value per merging layer: got {len(values)}, "
                f"this tower merges in {self.merge_layers} layers"
            )
        return lead + values

    def plan_for_length(self, num_tokens: int, visual_tokens: int | None = None) -> EncoderPlan:
        return EncoderPlan.from_config(self.config, self.layer_r(num_tokens, visual_tokens))

    def plan(self, height: int, width: int, visual_tokens: int | None = None) -> EncoderPlan:
        return self.plan_for_length(self.input_tokens(height, width), visual_tokens)

    def unreduced_tokens(self, height: int, width: int) -> int:
        """Visual tokens one image of this size yields without any reduction."""
        return self.input_tokens(height, width) - self.dropped_tokens

    def visual_tokens(self, height: int, width: int, visual_tokens: int | None = None) -> int:
        """Exact number of visual tokens one image of this size yields (what the LLM receives)."""
        from .schedule import output_tokens

        if not self.config.merges_in_encoder:
            kept = self.kept_tokens(height, width, visual_tokens)
            # FastV gives the LLM every visual token and prunes inside it.
            full = self.unreduced_tokens(height, width)
            return full if self.config.method == "fastv" else kept
        num_tokens = self.input_tokens(height, width)
        schedule = self.layer_r(num_tokens, visual_tokens)
        merged = output_tokens(num_tokens, schedule, self.num_protected)
        return merged - self.dropped_tokens + self.extra_tokens

    def kept_tokens(self, height: int, width: int, visual_tokens: int | None = None) -> int:
        """Tokens per image after reduction (FastV: from its pruning layer on), validated.

        Peers take ``visual_tokens`` or ``keep_ratio`` of the patches; a CLS token that the
        select strategy keeps stays and counts as one of the K.
        """
        if self.config.merges_in_encoder:
            return self.visual_tokens(height, width, visual_tokens)
        full = self.unreduced_tokens(height, width)
        patches = self.input_tokens(height, width) - self.num_protected
        kept_cls = full - patches
        if visual_tokens is None:
            visual_tokens = self.config.visual_tokens
        if visual_tokens is None:
            visual_tokens = kept_cls + max(1, round(self.config.keep_ratio * patches))
        if not kept_cls + 1 <= visual_tokens <= full:
            raise ValueError(
                f"visual_tokens={visual_tokens} is outside [{kept_cls + 1}, {full}]: this tower "
                f"yields {full} visual tokens per image and method={self.config.method!r} keeps "
                "between one patch and all of them"
            )
        return visual_tokens
