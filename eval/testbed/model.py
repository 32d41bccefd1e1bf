"""A tiny LLaVA-1.5-shaped reference model that the project trains itself, offline.

It keeps the conventions that visual-token merging interacts with (CLIP ViT with 14 px patches,
a 224 px image giving 16x16 = 256 patch tokens, features from the second-to-last layer with CLS
dropped, a two-layer GELU projector, a Llama decoder over `<image>` placeholders) while being
small enough to train on two CPU cores. Everything is standard transformers classes, so
`from_pretrained` loads it like any LLaVA checkpoint.

Prompt format (no chat template): ``"<image>\\nUSER: {question} ASSISTANT:"``; the answer is
generated greedily and ends at ``</s>`` (the word-level tokenizer drops newlines, so ``</s>`` is
the only stop token it can emit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

DEFAULT_PATH = Path(__file__).resolve().parent / "reference_model"
PROMPT_TEMPLATE = "<image>\nUSER: {question} ASSISTANT:"
TURN_TEMPLATE = "USER: {question} ASSISTANT:"
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD, UNK, BOS, EOS, IMAGE = SPECIAL_TOKENS
PATCH_SIZE = 14
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TEXT_POSITIONS = 1024


@dataclass(frozen=True)
class ModelSize:
    vision_width: int
    vision_layers: int  # the last one is unused: features come from layer -2, as in LLaVA-1.5
    vision_heads: int
    vision_mlp_ratio: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp_ratio: int


# The one place where model sizes live. The decoder runs over all 256 visual tokens, so its MLP
# dominates the cost on CPU; it gets the narrower ratio.
MODEL_SIZES: dict[str, ModelSize] = {
    "cpu-small": ModelSize(
        vision_width=128,
        vision_layers=5,
        vision_heads=2,
        vision_mlp_ratio=4,
        text_width=256,
        text_layers=2,
        text_heads=4,
        text_mlp_ratio=2,
    ),
    # cpu-small with a third LLM layer: room for a two-hop question (nearest to X, then its
    # colour) before the answer is read out.
    "cpu-small-3": ModelSize(
        vision_width=128,
        vision_layers=5,
        vision_heads=2,
        vision_mlp_ratio=4,
        text_width=256,
        text_layers=3,
        text_heads=4,
        text_mlp_ratio=2,
    ),
    "cpu-base": ModelSize(
        vision_width=192,
        vision_layers=5,
        vision_heads=3,
        vision_mlp_ratio=4,
        text_width=256,
        text_layers=2,
        text_heads=4,
        text_mlp_ratio=2,
    ),
    "cpu-tiny": ModelSize(
        vision_width=32,
        vision_layers=2,
        vision_heads=2,
        vision_mlp_ratio=2,
        text_width=32,
        text_layers=1,
        text_heads=2,
        text_mlp_ratio=2,
    ),
}


def format_prompt(question: str) -> str:
    """The single-turn prompt used for evaluation (and for each question's first turn)."""
    return PROMPT_TEMPLATE.format(question=question)


def build_tokenizer(vocab_words: Iterable[str]) -> Any:
    """Word-level tokenizer: the testbed's vocabulary is closed, so every word (and every
    answer) is one token and exact match needs no sub-word decoding."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [w for w in dict.fromkeys(vocab_words) if w not in SPECIAL_TOKENS]
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        image_token=IMAGE,
        padding_side="left",
        model_max_length=MAX_TEXT_POSITIONS,
    )


def build_processor(tokenizer: Any, image_size: int = 224) -> Any:
    """CLIP preprocessing at `image_size` (resize = crop = image_size, so nothing is cut off)
    plus the LLaVA processor that expands `<image>` into one placeholder per visual token."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        image_token=IMAGE,
    )


def build_model(
    tokenizer: Any, size: str = "cpu-small", image_size: int = 224, seed: int | None = None
) -> Any:
    """A randomly initialised LLaVA with LLaVA-1.5 conventions, sized by `MODEL_SIZES[size]`."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(MODEL_SIZES)}")
    dims = MODEL_SIZES[size]
    if seed is not None:
        torch.manual_seed(seed)
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    vision_config = CLIPVisionConfig(
        hidden_size=dims.vision_width,
        intermediate_size=dims.vision_width * dims.vision_mlp_ratio,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.vision_heads,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        projection_dim=dims.vision_width,
        hidden_act="quick_gelu",
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims.text_width,
        intermediate_size=dims.text_width * dims.text_mlp_ratio,
        num_hidden_layers=dims.text_layers,
        num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_heads,
        max_position_embeddings=MAX_TEXT_POSITIONS,
        bos_token_id=special[BOS],
        eos_token_id=special[EOS],
        pad_token_id=special[PAD],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=special[IMAGE],
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=special[PAD],
    )
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    position = model.model.vision_tower.embeddings.position_embedding.weight
    with torch.no_grad():
        position.copy_(sincos_position_embedding(image_size // PATCH_SIZE, dims.vision_width))
    _set_generation_defaults(model, tokenizer)
    return model


def sincos_position_embedding(grid: int, width: int, temperature: float = 10000.0) -> torch.Tensor:
    """2-D sine-cosine positions (CLS first, at zero), the usual from-scratch ViT start.

    CLIP's learned positions start as small noise, so a tower trained from scratch cannot tell
    neighbouring patches from distant ones until it has learned positions; with these it can
    attend locally from the first step (they stay trainable).
    """
    if width % 4:
        raise ValueError(f"vision width must be a multiple of 4 for 2-D sin-cos, got {width}")
    quarter = width // 4
    frequencies = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32),
        torch.arange(grid, dtype=torch.float32),
        indexing="ij",
    )
    angles_y = ys.reshape(-1, 1) * frequencies
    angles_x = xs.reshape(-1, 1) * frequencies
    patches = torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)
    return torch.cat([torch.zeros(1, width), patches])


def _set_generation_defaults(model: Any, tokenizer: Any) -> None:
    config = model.generation_config
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.do_sample = False
    config.max_new_tokens = 4


def build_reference(
    size: str = "cpu-small", image_size: int = 224, seed: int | None = 0
) -> tuple[Any, Any]:
    """Fresh (untrained) model and processor over the testbed vocabulary."""
    from eval.testbed.data import vocabulary_words

    tokenizer = build_tokenizer(vocabulary_words())
    processor = build_processor(tokenizer, image_size=image_size)
    return build_model(tokenizer, size=size, image_size=image_size, seed=seed), processor


def load_reference(
    path: str | Path = DEFAULT_PATH, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """Loads a saved testbed model and its processor with the stock `from_pretrained`."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no model at {folder} (config.json missing); train one with "
            "`crossget testbed-train` (or `make reference-model`)"
        )
    model = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    model.to(device).eval()
    return model, processor


def visual_tokens_per_image(model: Any, processor: Any, image: Image.Image) -> int:
    """Counts the `<image>` placeholders the processor inserts (what merging will act on)."""
    inputs = processor(
        images=[image], text=[format_prompt("what color is the circle?")], return_tensors="pt"
    )
    return int((inputs["input_ids"] == model.config.image_token_id).sum())


def normalize_answer(text: str) -> str:
    """Exact-match normalisation shared by all reports: first line, trimmed, lower case."""
    return text.split("\n", 1)[0].strip().lower()


@torch.inference_mode()
def answer(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    max_new_tokens: int = 4,
) -> list[str]:
    """Greedy answers for a batch (left padded, so every prompt ends where generation starts)."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images but {len(questions)} questions")
    if not questions:
        return []
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    inputs = processor(
        images=[image.convert("RGB") for image in images],
        text=[format_prompt(q) for q in questions],
        return_tensors="pt",
        padding=True,
    ).to(model.device)
    generated = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [normalize_answer(text) for text in texts]
