"""Fine-tune a CrossGET CLIP model for image-text retrieval on local image-caption files.

The loss mixes CLIP's contrastive loss and CrossGET's cross-token alignment (the symmetric
JS divergence between image and text cross tokens in the joint embedding space):
``loss = (1 - w) * contrastive + w * alignment`` with ``w = --alignment-weight`` (0.5, the
authors' even mix for CLIP retrieval).  By default only the cross-token prompts train
(``--train tokens``; the towers stay frozen); ``--train all`` also fine-tunes the towers, as
the authors' Flickr30k runs do.  Captions of the same image are all positives of each other's
image in the contrastive targets.

Checkpoints are written atomically (a temporary folder renamed into place, then a ``latest``
pointer file replaced) every ``--save-every`` steps and at the end; ``--resume`` continues from
the latest one with the same data order.

    python -m recipes.clip_retrieval --model ./clip-vit-b16 --images data/flickr/images \
        --captions data/flickr/train.jsonl --output runs/clip-r16 --r 16 --text-r 2
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

import mllm_crossget as crossget
from eval.clip_eval import ClipEncoder, RetrievalData, load_encoder, load_retrieval_data
from mllm_crossget.config import atomic_write_text

LATEST = "latest"
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model_weights.pt"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.clip_retrieval", description=__doc__.splitlines()[0]
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, help="local Hugging Face CLIPModel folder")
    model.add_argument("--open-clip", default=None, help="open_clip architecture name")
    model.add_argument("--pretrained", default=None, help="open_clip: local weights file")
    data = parser.add_argument_group("data")
    data.add_argument("--images", type=Path, required=True, help="folder the captions refer to")
    data.add_argument(
        "--captions",
        type=Path,
        required=True,
        help='training captions: .jsonl ({"image": path, "caption": text} per line) or .csv',
    )
    budget = parser.add_argument_group("CrossGET budget (exactly one)")
    budget.add_argument("--r", type=int, default=None, help="image tokens merged per layer")
    budget.add_argument(
        "--visual-tokens", type=int, default=None, help="image tokens left after the tower"
    )
    budget.add_argument(
        "--keep-ratio", type=float, default=None, help="fraction of patch tokens kept"
    )
    budget.add_argument(
        "--text-r",
        type=int,
        default=None,
        help="text tokens merged per layer (the text cross "
        "tokens and the alignment loss need it > 0)",
    )
    train = parser.add_argument_group("training")
    train.add_argument("--output", type=Path, required=True, help="checkpoint folder")
    train.add_argument(
        "--train",
        choices=("tokens", "all"),
        default="tokens",
        help="tokens: only the cross-token prompts; all: the towers too",
    )
    train.add_argument(
        "--alignment-weight",
        type=float,
        default=0.5,
        help="w in (1 - w) * contrastive + w * alignment",
    )
    train.add_argument("--epochs", type=int, default=1, help="passes over the captions")
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    train.add_argument("--batch-size", type=int, default=32, help="captions (pairs) per step")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    train.add_argument("--keep", type=int, default=2, help="checkpoints kept on disk")
    train.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    train.add_argument("--seed", type=int, default=0, help="data order and initialisation")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT/latest if it exists (its CrossGET config wins over the "
        "budget flags)",
    )
    train.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    return parser


def contrastive_loss(image: Tensor, text: Tensor, scale: Tensor, owners: Tensor) -> Tensor:
    """Symmetric InfoNCE with soft targets: every caption of an image is a positive."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    positive = (owners[:, None] == owners[None, :]).float()
    targets = positive / positive.sum(dim=1, keepdim=True)
    image_to_text = -(logits.log_softmax(dim=1) * targets).sum(dim=1).mean()
    text_to_image = -(logits.T.log_softmax(dim=1) * targets).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def _budget(args: argparse.Namespace) -> crossget.CrossGETConfig:
    return crossget.CrossGETConfig(
        r=args.r,
        visual_tokens=args.visual_tokens,
        keep_ratio=args.keep_ratio,
        text_r=args.text_r,
        alignment_weight=args.alignment_weight,
    )


def _trainable(encoder: ClipEncoder, mode: str) -> list[torch.nn.Parameter]:
    tokens = list(crossget.cross_tokens(encoder.model).parameters())
    for param in encoder.model.parameters():
        param.requires_grad_(mode == "all")
    for param in tokens:
        param.requires_grad_(True)
    return [p for p in encoder.model.parameters() if p.requires_grad]


def save_checkpoint(
    output: Path, step: int, encoder: ClipEncoder, optimizer: Any, mode: str, keep: int
) -> Path:
    """Write ``checkpoint-STEP`` via a temporary folder, then point ``latest`` at it."""
    output.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{step}"
    tmp = output / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    crossget.save_pretrained(encoder.model, tmp)
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    torch.save(state, tmp / STATE_FILE)
    if mode == "all":
        weights = {
            k: v for k, v in encoder.model.state_dict().items() if "crossget_tokens." not in k
        }
        torch.save(weights, tmp / WEIGHTS_FILE)
    final = output / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write_text(output / LATEST, name + "\n")
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in checkpoints[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(output: Path, encoder: ClipEncoder) -> tuple[Path, dict] | None:
    pointer = output / LATEST
    if not pointer.is_file():
        return None
    folder = output / pointer.read_text().strip()
    crossget.from_pretrained(encoder.model, folder)
    if (folder / WEIGHTS_FILE).is_file():
        weights = torch.load(folder / WEIGHTS_FILE, map_location=encoder.device)
        encoder.model.load_state_dict(weights, strict=False)
    return folder, torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)


def _batch(encoder: ClipEncoder, data: RetrievalData, picks: list[int]) -> tuple[Tensor, ...]:
    owners = torch.tensor([data.caption_image[i] for i in picks])
    images = [Image.open(data.images[int(o)]).convert("RGB") for o in owners]
    pixels = encoder.preprocess(images)
    tokens = encoder.tokenize([data.captions[i] for i in picks])
    return pixels, tokens, owners


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    encoder = load_encoder(args.model, args.open_clip, args.pretrained, args.device)
    data = load_retrieval_data(args.images, args.captions)
    resumed = load_checkpoint(args.output, encoder) if args.resume else None
    if resumed is None:
        crossget.apply(encoder.model, _budget(args))
    config = encoder.model.crossget_config
    if config.alignment_weight > 0 and not config.text_r:
        raise SystemExit(
            "the alignment loss pairs image and text cross tokens: give --text-r > 0, or "
            "--alignment-weight 0 for the contrastive loss alone"
        )
    params = _trainable(encoder, args.train)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    if resumed is not None:
        folder, state = resumed
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step = int(state["step"])
        print(f"resumed from {folder} at step {step}")
    encoder.model.train(args.train == "all")
    steps_per_epoch = math.ceil(len(data.captions) / args.batch_size)
    total = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    weight = config.alignment_weight
    start = time.perf_counter()
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        order = torch.randperm(len(data.captions), generator=generator).tolist()
        picks = order[offset * args.batch_size : (offset + 1) * args.batch_size]
        pixels, tokens, owners = _batch(encoder, data, picks)
        image = encoder.encode_images(pixels)
        text = encoder.encode_texts(tokens)
        contrastive = contrastive_loss(image, text, encoder.logit_scale(), owners.to(image.device))
        loss = (1 - weight) * contrastive
        alignment = torch.zeros(())
        if weight > 0:
            alignment = crossget.alignment_loss(encoder.model)
            loss = loss + weight * alignment
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % args.log_every == 0 or step == total:
            print(
                json.dumps(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": round(loss.item(), 5),
                        "contrastive": round(contrastive.item(), 5),
                        "alignment": round(alignment.item(), 5),
                        "s": round(time.perf_counter() - start, 1),
                    }
                ),
                flush=True,
            )
        if step % args.save_every == 0 or step == total:
            save_checkpoint(args.output, step, encoder, optimizer, args.train, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
