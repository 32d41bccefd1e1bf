"""FastV: the LLM drops visual tokens after layer K by the attention they receive.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024 (code: pkunlp-icler/FastV).

What runs (prefill): layers ``0 .. K-1`` see every token.  The attention of layer ``K-1``
from the **last token** of the prompt (FastV's choice; averaged over heads, softmax over all
earlier tokens) ranks each image's tokens; before layer ``K`` the sequence is *shortened in
place* to the text tokens plus the top ``keep`` tokens of each image, keeping their original
positions (RoPE) — FastV's "inplace" variant, not the attention-mask one.  Layers ``K ..``
and their KV cache hold only the kept tokens, so prefill, cache memory and every decode step
get cheaper.  The LLM *receives* all visual tokens at its input: ``num_visual_tokens`` is
what the processor emits (all), and only layers ``K ..`` see the budget.

How it works with Hugging Face's ``DynamicCache`` and ``generate``: forward hooks on the
projections of layer ``K-1`` capture its queries and keys (no extra projection is computed;
one query row is scored, so SDPA stays usable), forward pre-hooks on layers ``K ..`` swap in
the shortened hidden states, position embeddings and a gathered 4-D mask, and the kept
positions are stored on the cache object.  Decode steps read them back to gather the
columns of the mask that ``generate`` built for the full length (layer 0 still holds every
position, so position ids and mask sizes stay in the original numbering).  A forward hook
on the decoder scatters its output back to the full length (zeros at dropped positions), so
logits keep one row per input token.

Rows of a batch whose images keep different numbers of tokens (``crossget.budget``) are
padded to the longest row with *filler* entries: dropped positions that are carried along
but masked out as keys.  Limits: LLM attention must be ``sdpa`` or ``eager``; the cache must
be a ``DynamicCache``; one pruned prefill per cache (no second image turn on the same cache);
``generate(use_cache=False)`` re-ranks at every step as the authors' code does (with the
cache, the ranking of the prefill is kept).  Per-layer hidden states past layer K are short.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..merge import exact_dtypes

__all__ = [
    "FastVState",
    "attention_scores",
    "check",
    "install",
    "pruning",
    "ratio_keep",
    "run_keeps",
]

STATE_ATTR = "_crossget_fastv"
MEMO_ATTR = "_crossget_fastv_mask"


@dataclass(frozen=True)
class FastVState:
    """Kept positions of one pruned prefill, stored on the KV cache for decode steps.

    ``index`` [B, L]: the prefill positions layers ``K ..`` hold (ascending); ``valid`` [B, L]:
    False for filler entries; ``length``: the prefill length S.
    """

    index: Tensor
    valid: Tensor
    length: int
    all_valid: bool = True  # no filler entries (read per decode step without a device sync)


@dataclass
class _Selection:
    state: FastVState
    mask: Tensor | None
    position_embeddings: tuple[Tensor, Tensor]
    position_ids: Tensor | None


@dataclass
class _Prefill:
    """What one prefill forward needs (held in a context variable for that forward only)."""

    runs: list[tuple[int, int, int, int]]  # (row, start, length, keep) per image
    key_valid: Tensor  # [B, S] real (non-padding) tokens
    last: Tensor  # [B] position of each row's last real token
    key_bias: Tensor | None = None  # [B, S] additive bias the LLM puts on each key (or None)
    captured: dict[str, Tensor] = field(default_factory=dict)
    selection: _Selection | None = None


_PREFILL: contextvars.ContextVar[_Prefill | None] = contextvars.ContextVar(
    "crossget_fastv_prefill", default=None
)


def run_keeps(
    rows: Sequence[int], override: Sequence[int] | int | None, default: int | None
) -> list[int | None]:
    """Budget of each image run (reading order), also when ``generate`` repeated rows.

    ``override`` is what ``crossget.budget`` holds: one int, or one per image of the
    *original* batch.  Beam search and ``num_return_sequences`` repeat each row in place
    (``repeat_interleave``), so a run's budget is found through its row.
    """
    if override is None or isinstance(override, int):
        return [override if override is not None else default] * len(rows)
    budgets = [int(v) for v in override]
    if len(rows) == len(budgets):
        return list(budgets)
    num_rows = max(rows) + 1 if rows else 0
    runs_per_row = [rows.count(r) for r in range(num_rows)]
    times = len(rows) // max(len(budgets), 1)
    if times < 1 or len(rows) != times * len(budgets) or num_rows % times:
        raise ValueError(
            f"got {len(budgets)} per-image budgets for {len(rows)} images; give one per image "
            "(in the order the images were passed to the processor) or a single int"
        )
    keeps: list[int | None] = []
    offset = 0
    for original in range(num_rows // times):
        count = runs_per_row[original * times]
        for _ in range(times):
            keeps.extend(budgets[offset : offset + count])
        offset += count
    return keeps


def ratio_keep(count: int, ratio: float) -> int:
    """Tokens an image of ``count`` visual tokens keeps under ``llm_keep_ratio=ratio``:
    rounded half up, at least 1, at most ``count``."""
    return max(1, min(count, int(count * ratio + 0.5)))


@contextlib.contextmanager
def pruning(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    image_token_id: int,
    keeps: Sequence[int],
    key_bias: Tensor | None = None,
) -> Iterator[None]:
    """Make the next LLM prefill prune each image run to its ``keeps`` entry.

    ``key_bias`` [B, S]: the additive bias the LLM's attention puts on each key (the token
    sizes of ``llm_proportional_attention``), so the ranking reads the attention the layer
    really computes."""
    is_image = (input_ids == image_token_id).to(torch.int8)
    padded = nn.functional.pad(is_image, (1, 1))
    edges = padded[:, 1:] - padded[:, :-1]
    runs: list[tuple[int, int, int, int]] = []
    for row in range(input_ids.shape[0]):
        starts = (edges[row] == 1).nonzero().flatten().tolist()
        ends = (edges[row] == -1).nonzero().flatten().tolist()
        for start, end in zip(starts, ends, strict=True):
            runs.append((row, start, end - start, 0))
    if len(runs) != len(keeps):
        raise ValueError(f"FastV: {len(runs)} image runs but {len(keeps)} budgets")
    runs = [(r, s, n, int(k)) for (r, s, n, _), k in zip(runs, keeps, strict=True)]
    if attention_mask is not None and attention_mask.dim() == 2:
        key_valid = attention_mask.bool()
    else:
        key_valid = torch.ones_like(input_ids, dtype=torch.bool)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (key_valid * positions).amax(dim=1)
    token = _PREFILL.set(_Prefill(runs, key_valid, last, key_bias))
    try:
        yield
    finally:
        _PREFILL.reset(token)


def check(language_model: nn.Module, layer: int) -> None:
    """Raise a clear error before anything is patched when FastV cannot run on this LLM."""
    layers = language_model.layers
    if not 1 <= layer < len(layers):
        raise ValueError(
            f"fastv_layer={layer} must be in [1, {len(layers) - 1}]: this LLM has {len(layers)} "
            "layers, and FastV ranks tokens with the attention of the layer before"
        )
    implementation = getattr(language_model.config, "_attn_implementation", None) or "eager"
    if implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"FastV needs the LLM's attention to be 'sdpa' or 'eager', got {implementation!r}; "
            "load the model with attn_implementation='sdpa'"
        )
    source = layers[layer - 1].self_attn
    for name in ("q_proj", "k_proj"):
        if not hasattr(source, name):
            raise TypeError(f"FastV needs Llama-style attention ({name}), got {type(source)}")


def install(language_model: nn.Module, layer: int) -> list[Any]:
    """Hook the decoder so that layers ``layer ..`` keep only the selected visual tokens."""
    check(language_model, layer)
    layers = language_model.layers
    implementation = getattr(language_model.config, "_attn_implementation", None) or "eager"
    source = layers[layer - 1].self_attn
    handles = [
        source.q_proj.register_forward_hook(_capture("query")),
        source.k_proj.register_forward_hook(_capture("key")),
        language_model.register_forward_hook(_restore_length),
    ]
    for index in range(layer, len(layers)):
        hook = _pre_layer(first=index == layer, source=source, eager=implementation == "eager")
        handles.append(layers[index].register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _capture(name: str) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        context = _PREFILL.get()
        if context is not None and context.selection is None:
            context.captured[name] = output

    return hook


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding (``x * cos + rotate_half(x) * sin``), heads on dim -2."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


@exact_dtypes
def attention_scores(
    attn: nn.Module,
    query: Tensor,
    key: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    last: Tensor,
    key_valid: Tensor,
    key_bias: Tensor | None = None,
) -> Tensor:
    """[B, S]: head-averaged attention of each row's last token over all positions.

    ``query``/``key`` are the raw ``q_proj``/``k_proj`` outputs [B, S, H*D] of the scoring
    layer; RoPE is applied here, as the layer itself does, and keys after ``last`` or on
    padding are masked; ``key_bias`` [B, S] is added to the logits as the layer's mask adds
    it.  This is the row FastV reads from ``output_attentions``.
    """
    batch, length, _ = key.shape
    head_dim = attn.head_dim
    rows = torch.arange(batch, device=key.device)
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
    q = query[rows, last].view(batch, -1, head_dim)  # [B, H, D]
    k = key.view(batch, length, -1, head_dim)  # [B, S, Hkv, D]
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = _rotate(q.float(), cos[rows, last].float(), sin[rows, last].float())
    k = _rotate(k.float(), cos.float(), sin.float())
    k = k.repeat_interleave(q.shape[1] // k.shape[2], dim=2)
    logits = torch.einsum("bhd,bshd->bhs", q, k) * attn.scaling
    if key_bias is not None:
        logits = logits + key_bias.float()[:, None, :]
    positions = torch.arange(length, device=key.device)
    allowed = key_valid & (positions[None, :] <= last[:, None])
    logits = logits.masked_fill(~allowed[:, None, :], -torch.inf)
    return logits.softmax(dim=-1).mean(dim=1)


def _select(context: _Prefill, scores: Tensor) -> tuple[Tensor, Tensor]:
    """(index [B, L], valid [B, L]): kept positions per row, padded with filler entries."""
    batch, length = scores.shape
    keep = torch.ones(batch, length, dtype=torch.bool, device=scores.device)
    for row, start, count, budget in context.runs:
        run = scores[row, start : start + count].clone()
        last = int(context.last[row])
        if start <= last < start + count:
            run[last - start] = torch.inf  # the logits row must survive
        order = torch.sort(-run, stable=True).indices[:budget]
        keep[row, start : start + count] = False
        keep[row, start + order] = True
    counts = keep.sum(dim=1)
    width = int(counts.max())
    dropped = ~keep
    filler = dropped & (dropped.cumsum(dim=1) <= (width - counts)[:, None])
    chosen = keep | filler
    index = torch.sort((~chosen).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    return index, keep.gather(1, index)


def _gather_rows_cols(mask: Tensor, index: Tensor, rows: bool) -> Tensor:
    batch = index.shape[0]
    mask = mask.expand(batch, -1, -1, -1)
    heads, queries, keys = mask.shape[1:]
    if rows:
        mask = mask.gather(2, index[:, None, :, None].expand(-1, heads, -1, keys))
        queries = index.shape[1]
    return mask.gather(3, index[:, None, None, :].expand(-1, heads, queries, -1))


def _block_columns(mask: Tensor, allowed: Tensor) -> Tensor:
    """Mask out keys where ``allowed`` [B, 1, Q, K] is False, in the mask's own format."""
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def _prefill_mask(
    mask: Tensor | None, index: Tensor, valid: Tensor, all_valid: bool, eager: bool, dtype: Any
) -> Tensor:
    length = index.shape[1]
    if mask is None:
        mask = index[:, None, None, :] <= index[:, None, :, None]  # causal on original positions
        if eager:
            zero = torch.zeros((), dtype=dtype, device=index.device)
            mask = torch.where(mask, zero, torch.finfo(dtype).min)
    else:
        mask = _gather_rows_cols(mask, index, rows=True)
    if all_valid:
        return mask
    # Filler entries are keys for nobody but themselves (no fully masked rows, no NaN).
    eye = torch.eye(length, dtype=torch.bool, device=index.device)
    return _block_columns(mask, valid[:, None, None, :] | eye)


def _decode_mask(
    mask: Tensor | None, state: FastVState, total: int, queries: int, eager: bool, dtype: Any
) -> Tensor | None:
    new = torch.arange(state.length, total, device=state.index.device)
    columns = torch.cat([state.index, new.expand(state.index.shape[0], -1)], dim=1)
    valid = torch.cat(
        [state.valid, torch.ones_like(new, dtype=torch.bool).expand(state.index.shape[0], -1)],
        dim=1,
    )
    if mask is not None:
        mask = _gather_rows_cols(mask, columns, rows=False)
        return mask if state.all_valid else _block_columns(mask, valid[:, None, None, :])
    if state.all_valid:
        return None  # one query, everything visible: SDPA needs no mask
    query_pos = torch.arange(total - queries, total, device=columns.device)
    allowed = (columns[:, None, None, :] <= query_pos[None, None, :, None]) & valid[:, None, None]
    if not eager:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=columns.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _cache_state(cache: Any, batch: int) -> FastVState | None:
    state: FastVState | None = getattr(cache, STATE_ATTR, None)
    if state is None or state.index.shape[0] == batch:
        return state
    if batch % state.index.shape[0]:
        raise RuntimeError(
            f"FastV: the cache holds {state.index.shape[0]} pruned rows but the step has {batch}"
        )
    times = batch // state.index.shape[0]  # the cache was repeated (e.g. contrastive search)
    state = FastVState(
        state.index.repeat_interleave(times, 0),
        state.valid.repeat_interleave(times, 0),
        state.length,
        state.all_valid,
    )
    setattr(cache, STATE_ATTR, state)
    return state


def _pre_layer(first: bool, source: nn.Module, eager: bool) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        context = _PREFILL.get()
        cache = kwargs.get("past_key_values")
        if context is not None and first:
            if cache is not None and getattr(cache, STATE_ATTR, None) is not None:
                raise RuntimeError(
                    "FastV prunes one prefill per KV cache: this cache already holds a pruned "
                    "image prompt; start a new cache for a new image"
                )
            context.selection = _prune(context, hidden, kwargs, source, eager)
            if cache is not None:
                setattr(cache, STATE_ATTR, context.selection.state)
        if context is not None and context.selection is not None:
            selection = context.selection
            if first:
                index = selection.state.index
                hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
            kwargs["attention_mask"] = selection.mask
            kwargs["position_embeddings"] = selection.position_embeddings
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = selection.position_ids
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs
        if context is None and cache is not None:
            state = _cache_state(cache, hidden.shape[0])
            if state is None:
                return None
            mask = kwargs.get("attention_mask")
            total = mask.shape[-1] if mask is not None else cache.get_seq_length(0)
            # Every later layer of one step gets the same mask: gather its columns once.
            memo = getattr(cache, MEMO_ATTR, None)
            if memo is None or memo[0] is not mask or memo[1] != total:
                new_mask = _decode_mask(mask, state, total, hidden.shape[1], eager, hidden.dtype)
                memo = (mask, total, new_mask)
                setattr(cache, MEMO_ATTR, memo)
            kwargs["attention_mask"] = memo[2]
            return args, kwargs
        return None

    return hook


def _prune(
    context: _Prefill, hidden: Tensor, kwargs: dict[str, Any], source: nn.Module, eager: bool
) -> _Selection:
    if "query" not in context.captured or "key" not in context.captured:
        raise RuntimeError("FastV: the scoring layer's projections were not captured (a bug)")
    cos, sin = kwargs["position_embeddings"]
    batch = hidden.shape[0]
    scores = attention_scores(
        source,
        context.captured.pop("query"),
        context.captured.pop("key"),
        (cos, sin),
        context.last.to(hidden.device),
        context.key_valid.to(hidden.device),
        None if context.key_bias is None else context.key_bias.to(hidden.device),
    )
    index, valid = _select(context, scores)
    expand = index[..., None].expand(-1, -1, cos.shape[-1])
    embeddings = (
        cos.expand(batch, -1, -1).gather(1, expand),
        sin.expand(batch, -1, -1).gather(1, expand),
    )
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        position_ids = position_ids.expand(batch, -1).gather(1, index)
    all_valid = bool(valid.all())
    mask = _prefill_mask(kwargs.get("attention_mask"), index, valid, all_valid, eager, hidden.dtype)
    state = FastVState(index=index, valid=valid, length=hidden.shape[1], all_valid=all_valid)
    return _Selection(state, mask, embeddings, position_ids)


def _restore_length(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Scatter the decoder's short output back to one row per input token (zeros if dropped)."""
    context = _PREFILL.get()
    if context is None or context.selection is None:
        return None
    state = context.selection.state
    short = output.last_hidden_state
    full = short.new_zeros(short.shape[0], state.length, short.shape[-1])
    kept = short * state.valid[..., None].to(short.dtype)
    full.scatter_(1, state.index[..., None].expand(-1, -1, short.shape[-1]), kept)
    output.last_hidden_state = full
    return output
