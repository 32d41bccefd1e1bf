"""Word-to-patch grounding loss for training the testbed reference model.

A two-layer LLM trained from scratch sits on the answer-prior plateau for thousands of steps:
nothing but the answer loss tells its attention which of 256 patches a question word is about,
and that signal only arrives once the rest of the circuit already works. The testbed's scene
metadata says which patches each colour, shape and digit word names, so one attention head of
one early layer is trained to put its mass there: `-log(attention mass on the named patches)`
for every grounded word, the word-region alignment objective of grounded pretraining (MDETR,
GLIP). The same loss, on a later layer at the position that predicts the answer, points
that position at the patches the answer rests on (`evidence_mask`), or (readout) at the
question's grounded words, which after the first layer carry what they found in the image. It
shapes training only; inference is the unchanged LLaVA.
"""

from __future__ import annotations

from typing import Any

import torch

POSITIONS_KEY = "grounding_positions"
MASKS_KEY = "grounding_masks"
EVIDENCE_POSITIONS_KEY = "evidence_positions"
EVIDENCE_MASKS_KEY = "evidence_masks"
READOUT_POSITIONS_KEY = "readout_positions"
READOUT_MASKS_KEY = "readout_masks"  # over sequence positions, not patches
# Batch entries for these losses only; the trainer takes them out before the model's forward.
SIDE_KEYS: tuple[str, ...] = (
    POSITIONS_KEY,
    MASKS_KEY,
    EVIDENCE_POSITIONS_KEY,
    EVIDENCE_MASKS_KEY,
    READOUT_POSITIONS_KEY,
    READOUT_MASKS_KEY,
)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class GroundingLoss:
    """Callable `(model, inputs, outputs) -> loss` for `TestbedTrainer(extra_losses=...)`.

    It reads the layer's input through a forward pre-hook and recomputes only the supervised
    heads' attention rows, so the model keeps its fast (sdpa) attention.
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
        self.weight = weight
        self.heads = heads
        self.positions_key, self.masks_key = positions_key, masks_key
        self.first_head, self.over_patches = first_head, over_patches
        self.attention = attention
        self.image_token_id = model.config.image_token_id
        self._captured: dict[str, Any] = {}
        self._handle = attention.register_forward_pre_hook(self._capture, with_kwargs=True)

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
        keys = module.k_proj(hidden).view(batch, length, -1, d)[:, :, supervised]  # (B, T, h, d)
        keys = keys * cos[:, :, None] + _rotate_half(keys) * sin[:, :, None]
        query_hidden = hidden[rows, query_positions]  # (N, D)
        queries = module.q_proj(query_hidden).view(len(rows), -1, d)[:, supervised]  # (N, h, d)
        q_cos, q_sin = cos[rows, query_positions][:, None], sin[rows, query_positions][:, None]
        queries = queries * q_cos + _rotate_half(queries) * q_sin
        scores = torch.einsum("nhd,nthd->nht", queries, keys[rows]) * module.scaling
        key_index = torch.arange(length, device=hidden.device)
        scores = scores.masked_fill(key_index[None, None] > query_positions[:, None, None], -1e9)
        log_attention = scores.float().log_softmax(dim=-1)  # (N, h, T)
        target = masks[rows, slots][:, None]  # (N, 1, P or T)
        if not self.over_patches:
            masked = log_attention.masked_fill(~target[..., :length], float("-inf"))
            return -self.weight * masked.logsumexp(dim=-1).mean()
        image_positions = _image_positions(inputs["input_ids"], self.image_token_id)  # (B, P)
        patch_log_attention = log_attention.gather(
            2, image_positions[rows][:, None].expand(-1, h, -1)
        )  # (N, h, P)
        masked = patch_log_attention.masked_fill(~target, float("-inf"))
        log_mass = masked.logsumexp(dim=-1)  # log of the attention mass on the named patches
        return -self.weight * log_mass.mean()


def _image_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    is_image = input_ids == image_token_id
    counts = is_image.sum(dim=1)
    if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        raise ValueError("grounding loss needs exactly one image (same token count) per sequence")
    return is_image.nonzero(as_tuple=True)[1].view(input_ids.shape[0], -1)


__all__ = [
    "EVIDENCE_MASKS_KEY",
    "EVIDENCE_POSITIONS_KEY",
    "MASKS_KEY",
    "POSITIONS_KEY",
    "READOUT_MASKS_KEY",
    "READOUT_POSITIONS_KEY",
    "SIDE_KEYS",
    "GroundingLoss",
]
