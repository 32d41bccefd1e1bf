"""Zero-shot classification and image-text retrieval for CLIP models, on local files.

Works with a Hugging Face ``CLIPModel`` folder (``--model DIR``: model, tokenizer and image
processor saved there) or an open_clip model (``--open-clip NAME`` with ``--pretrained FILE``
for local weights).  Every budget in ``--budgets`` is scored on the same data in one run:

    python -m eval.clip_eval retrieval --model ./clip-vit-b16 --images data/flickr/images \
        --captions data/flickr/test.jsonl --budgets full,r16 --text-r 2
    python -m eval.clip_eval zeroshot --open-clip ViT-B-16 --pretrained vitb16.bin \
        --image-folder data/imagenet-val --budgets full,r16

Retrieval data: a folder of images and a captions file, ``.jsonl`` (one
``{"image": "relative/path.jpg", "caption": "..."}`` per line) or ``.csv`` (columns ``image``
and ``caption``); an image may have several captions (Flickr30k/COCO have five).  Zero-shot
data: ``ROOT/<class name>/<image>``; class names are the folder names (``_`` read as spaces)
and are filled into ``--templates``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

import mllm_crossget as crossget
from mllm_crossget.config import write_json_atomic

__all__ = [
    "ClipEncoder",
    "RetrievalData",
    "load_encoder",
    "load_image_folder",
    "load_retrieval_data",
    "retrieval_recall",
    "zero_shot_accuracy",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
IMAGE_KEYS = ("image", "file_name", "filename", "image_path", "path")
CAPTION_KEYS = ("caption", "text", "sentence", "raw")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


# ------------------------------------------------------------------ metrics (pure)


def retrieval_recall(
    similarity: Tensor, text_to_image: Sequence[int] | Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k in percent, both directions, from an ``[images, texts]`` similarity matrix.

    ``text_to_image[t]`` is the image caption ``t`` describes.  Image->text: an image is a hit
    when *any* of its captions ranks in its top k (the Flickr30k/COCO protocol);
    text->image: a caption is a hit when its image ranks in its top k.  Ties rank the
    correct item after equal-scored others (no credit for ties).
    """
    num_images, num_texts = similarity.shape
    owner = torch.as_tensor(text_to_image, dtype=torch.long, device=similarity.device)
    if owner.shape != (num_texts,):
        raise ValueError(f"text_to_image needs one image per text ({num_texts}), got {owner.shape}")
    if num_texts and (owner.min() < 0 or owner.max() >= num_images):
        raise ValueError(f"text_to_image holds indices outside [0, {num_images})")
    sim = similarity.float()
    positive = owner[None, :] == torch.arange(num_images, device=sim.device)[:, None]
    if not bool(positive.any(dim=1).all()):
        raise ValueError("every image needs at least one caption")
    # Image -> text: rank of the best-scored correct caption = texts scoring strictly higher,
    # plus ties with other (wrong) captions.
    best = sim.masked_fill(~positive, -torch.inf).amax(dim=1, keepdim=True)
    i2t_rank = ((sim > best) | ((sim == best) & ~positive)).sum(dim=1)
    # Text -> image: images scoring higher than the correct one (ties count against it).
    correct = sim.gather(0, owner[None, :])  # [1, texts]
    t2i_rank = ((sim >= correct) & ~positive).sum(dim=0)
    result: dict[str, float] = {}
    for k in ks:
        result[f"i2t_r{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
    for k in ks:
        result[f"t2i_r{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    result["rsum"] = sum(result.values())
    return result


def zero_shot_accuracy(
    logits: Tensor, labels: Sequence[int] | Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy in percent from ``[images, classes]`` scores (ties count as misses)."""
    target = torch.as_tensor(labels, dtype=torch.long, device=logits.device)
    correct = logits.float().gather(1, target[:, None])
    rank = ((logits.float() >= correct) & ~F.one_hot(target, logits.shape[1]).bool()).sum(dim=1)
    return {f"top{k}": 100.0 * (rank < k).float().mean().item() for k in ks}


# ------------------------------------------------------------------ local data


@dataclass(frozen=True)
class RetrievalData:
    images: list[Path]  # unique images
    captions: list[str]
    caption_image: list[int]  # image index of each caption


def _pick(record: dict[str, Any], keys: Sequence[str], what: str, where: str) -> str:
    for key in keys:
        if record.get(key) not in (None, ""):
            return str(record[key])
    raise ValueError(f"{where}: no {what} field (tried {', '.join(keys)}) in {sorted(record)}")


def load_retrieval_data(images_dir: str | Path, captions_file: str | Path) -> RetrievalData:
    """Image paths (unique, first-seen order) and captions from a ``.jsonl`` or ``.csv`` file."""
    images_dir, captions_file = Path(images_dir), Path(captions_file)
    if captions_file.suffix == ".csv":
        with captions_file.open(newline="") as handle:
            records = list(csv.DictReader(handle))
    else:
        lines = captions_file.read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    index: dict[str, int] = {}
    images: list[Path] = []
    captions: list[str] = []
    owners: list[int] = []
    for number, record in enumerate(records, start=1):
        where = f"{captions_file}:{number}"
        name = _pick(record, IMAGE_KEYS, "image", where)
        if name not in index:
            path = images_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{where}: image {path} does not exist")
            index[name] = len(images)
            images.append(path)
        captions.append(_pick(record, CAPTION_KEYS, "caption", where))
        owners.append(index[name])
    if not captions:
        raise ValueError(f"{captions_file} holds no captions")
    return RetrievalData(images, captions, owners)


def load_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """``ROOT/<class>/<image>`` -> (paths, labels, class names), classes sorted by folder."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    if not paths:
        raise ValueError(f"no images under {root}/<class>/")
    return paths, labels, [folder.name.replace("_", " ") for folder in folders]


# ------------------------------------------------------------------ encoders


class ClipEncoder:
    """One interface over HF and open_clip models: images/texts -> unnormalised features."""

    def __init__(
        self,
        model: nn.Module,
        preprocess: Callable[[list[Image.Image]], Tensor],
        tokenize: Callable[[list[str]], dict[str, Tensor]],
        kind: str,
    ) -> None:
        self.model, self.preprocess, self.tokenize, self.kind = model, preprocess, tokenize, kind

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_images(self, pixels: Tensor) -> Tensor:
        pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
        if self.kind == "hf":
            return self.model.get_image_features(pixel_values=pixels).pooler_output
        return self.model.encode_image(pixels)

    def encode_texts(self, tokens: dict[str, Tensor]) -> Tensor:
        tokens = {key: value.to(self.device) for key, value in tokens.items()}
        if self.kind == "hf":
            return self.model.get_text_features(**tokens).pooler_output
        return self.model.encode_text(tokens["text"])

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()


def load_encoder(
    model: str | None = None,
    open_clip_name: str | None = None,
    pretrained: str | None = None,
    device: str = "cpu",
) -> ClipEncoder:
    """A local HF ``CLIPModel`` folder, or an open_clip architecture (+ local weights)."""
    if (model is None) == (open_clip_name is None):
        raise ValueError("give exactly one of --model (HF folder) or --open-clip (name)")
    if model is not None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        hf_model = CLIPModel.from_pretrained(model, attn_implementation="sdpa").to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model)
        image_processor = AutoImageProcessor.from_pretrained(model)
        max_length = hf_model.config.text_config.max_position_embeddings

        def preprocess(images: list[Image.Image]) -> Tensor:
            return image_processor(images=images, return_tensors="pt")["pixel_values"]

        def tokenize(texts: list[str]) -> dict[str, Tensor]:
            batch = tokenizer(
                texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

        return ClipEncoder(hf_model, preprocess, tokenize, "hf")

    import open_clip

    oc_model, _, transform = open_clip.create_model_and_transforms(
        open_clip_name, pretrained=pretrained, device=device
    )
    oc_tokenizer = open_clip.get_tokenizer(open_clip_name)

    def oc_preprocess(images: list[Image.Image]) -> Tensor:
        return torch.stack([transform(image) for image in images])

    def oc_tokenize(texts: list[str]) -> dict[str, Tensor]:
        return {"text": oc_tokenizer(texts)}

    return ClipEncoder(oc_model.eval(), oc_preprocess, oc_tokenize, "open_clip")


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


@torch.inference_mode()
def image_features(encoder: ClipEncoder, paths: Sequence[Path], batch_size: int) -> Tensor:
    chunks = []
    for batch in _batches(paths, batch_size):
        images = [Image.open(path).convert("RGB") for path in batch]
        chunks.append(
            F.normalize(encoder.encode_images(encoder.preprocess(images)).float(), dim=-1)
        )
    return torch.cat(chunks)


@torch.inference_mode()
def text_features(encoder: ClipEncoder, texts: Sequence[str], batch_size: int) -> Tensor:
    chunks = [
        F.normalize(encoder.encode_texts(encoder.tokenize(list(batch))).float(), dim=-1)
        for batch in _batches(texts, batch_size)
    ]
    return torch.cat(chunks)


def evaluate_retrieval(encoder: ClipEncoder, data: RetrievalData, batch_size: int) -> dict:
    start = time.perf_counter()
    images = image_features(encoder, data.images, batch_size)
    image_s = time.perf_counter() - start
    texts = text_features(encoder, data.captions, batch_size)
    result = retrieval_recall(images @ texts.T, data.caption_image)
    return result | {"image_s": image_s, "text_s": time.perf_counter() - start - image_s}


def evaluate_zero_shot(
    encoder: ClipEncoder,
    paths: Sequence[Path],
    labels: Sequence[int],
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int,
) -> dict:
    """Each class embedding is the normalised mean of its templated prompts' embeddings."""
    start = time.perf_counter()
    images = image_features(encoder, paths, batch_size)
    image_s = time.perf_counter() - start
    classes = []
    for name in class_names:
        prompts = text_features(encoder, [t.format(name) for t in templates], batch_size)
        classes.append(F.normalize(prompts.mean(dim=0), dim=-1))
    result = zero_shot_accuracy(images @ torch.stack(classes).T, labels)
    return result | {"image_s": image_s, "text_s": time.perf_counter() - start - image_s}


# ------------------------------------------------------------------ budgets and CLI


def parse_budget(text: str, text_r: int | None) -> crossget.CrossGETConfig | None:
    """``full`` -> None; ``rN`` -> r=N; ``P%`` -> keep_ratio; ``K`` -> visual_tokens=K."""
    if text == "full":
        return None
    if text.startswith("r"):
        return crossget.CrossGETConfig(r=int(text[1:]), text_r=text_r)
    if text.endswith("%"):
        return crossget.CrossGETConfig(keep_ratio=float(text[:-1]) / 100, text_r=text_r)
    return crossget.CrossGETConfig(visual_tokens=int(text), text_r=text_r)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.clip_eval", description=__doc__.splitlines()[0]
    )
    parser.add_argument("task", choices=("retrieval", "zeroshot"), help="what to score")
    parser.add_argument("--model", default=None, help="local Hugging Face CLIPModel folder")
    parser.add_argument("--open-clip", default=None, help="open_clip architecture name")
    parser.add_argument("--pretrained", default=None, help="open_clip: local weights file")
    parser.add_argument("--images", type=Path, help="retrieval: folder the captions refer to")
    parser.add_argument("--captions", type=Path, help="retrieval: captions .jsonl or .csv")
    parser.add_argument("--image-folder", type=Path, help="zeroshot: ROOT/<class>/<image>")
    parser.add_argument(
        "--templates",
        default="|".join(DEFAULT_TEMPLATES),
        help="zeroshot: prompt templates with {} for the class name, separated by '|'",
    )
    parser.add_argument(
        "--budgets",
        default="full,r16",
        help="comma list: full, rN (tokens merged per image layer), P%%, or a token count K",
    )
    parser.add_argument(
        "--text-r", type=int, default=None, help="tokens merged per text layer (None: none)"
    )
    parser.add_argument(
        "--crossget-dir",
        type=Path,
        default=None,
        help="trained cross tokens (crossget.save_pretrained output); overrides --budgets",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images or texts per batch")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    encoder = load_encoder(args.model, args.open_clip, args.pretrained, args.device)
    if args.task == "retrieval":
        if args.images is None or args.captions is None:
            raise SystemExit("retrieval needs --images and --captions")
        data = load_retrieval_data(args.images, args.captions)

        def run() -> dict:
            return evaluate_retrieval(encoder, data, args.batch_size)

    else:
        if args.image_folder is None:
            raise SystemExit("zeroshot needs --image-folder")
        paths, labels, names = load_image_folder(args.image_folder)
        templates = args.templates.split("|")

        def run() -> dict:
            return evaluate_zero_shot(encoder, paths, labels, names, templates, args.batch_size)

    rows = []
    setups: list[tuple[str, Any]] = (
        [("trained", args.crossget_dir)]
        if args.crossget_dir
        else [(b, parse_budget(b, args.text_r)) for b in args.budgets.split(",")]
    )
    for name, setup in setups:
        crossget.remove(encoder.model)
        if isinstance(setup, Path):
            crossget.from_pretrained(encoder.model, setup)
        elif setup is not None:
            crossget.apply(encoder.model, setup)
        rows.append({"budget": name} | run())
    crossget.remove(encoder.model)
    keys = [key for key in rows[0] if key != "budget"]
    print("| budget | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in rows:
        print(f"| {row['budget']} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
    if args.json:
        write_json_atomic(
            args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
