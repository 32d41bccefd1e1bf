"""CrossGET in CLIP two-tower models: HF ``CLIPModel`` and open_clip ``CLIP`` (tiny, random),
plus the retrieval / zero-shot metrics and the retrieval fine-tuning recipe.

Image towers see 56x56 images in 7x7 patches (64 patches + CLS = 65 tokens, 4 layers); text
towers have 3 layers.  Captions: ``BOS w.. EOS`` then padding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from tiny_models import single_thread
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    PreTrainedTokenizerFast,
)

import mllm_crossget as crossget
from eval.clip_eval import retrieval_recall, zero_shot_accuracy
from mllm_crossget import CrossGETConfig
from mllm_crossget.adapters import clip_pair, hf_clip_model
from mllm_crossget.adapters import open_clip as open_clip_adapter
from mllm_crossget.adapters.hf_clip import EncoderPlan
from mllm_crossget.adapters.vit_layer import TokenState, merging_block

NUM_TOKENS = 65
BOS, EOS, PAD = 2, 3, 1
OC_BOS, OC_EOS = 98, 99  # open_clip: EOT is the largest id (argmax pooling), padding is 0


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def tiny_hf_clip(seed: int = 0, attn: str = "sdpa") -> CLIPModel:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=56,
        patch_size=7,
        projection_dim=16,
    )
    text = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=16,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        projection_dim=16,
    )
    config = CLIPConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=16
    )
    config._attn_implementation = attn
    return CLIPModel(config).eval()


def tiny_open_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=4, width=32, head_width=8, image_size=56, patch_size=7),
        text_cfg=CLIPTextCfg(context_length=12, vocab_size=100, width=32, heads=4, layers=3),
    ).eval()


def captions(lengths: list[int], width: int, *, bos: int, eos: int, pad: int) -> torch.Tensor:
    """One caption per length (``length`` words between BOS and EOS), right-padded."""
    rows = []
    for row, n in enumerate(lengths):
        words = [10 + (row * 13 + i * 7) % 80 for i in range(n)]
        ids = [bos, *words, eos]
        rows.append(ids + [pad] * (width - len(ids)))
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_text() -> dict[str, torch.Tensor]:
    ids = captions([7, 4, 9], 12, bos=BOS, eos=EOS, pad=PAD)
    return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


@pytest.fixture(scope="module")
def oc_text() -> torch.Tensor:
    return captions([7, 4, 9], 12, bos=OC_BOS, eos=OC_EOS, pad=0)


def hf_outputs(model: CLIPModel, pixels: torch.Tensor, text: dict[str, torch.Tensor]) -> object:
    with torch.no_grad():
        return model(pixel_values=pixels, **text)


def oc_outputs(model: torch.nn.Module, pixels: torch.Tensor, text: torch.Tensor) -> tuple:
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(text)


def image_tokens_seen_by_ln_post(model: torch.nn.Module, pixels: torch.Tensor) -> int:
    """open_clip pools after ``ln_post``; its input is the tower's final token sequence."""
    seen: list[int] = []
    handle = model.visual.ln_post.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    try:
        with torch.no_grad():
            model.encode_image(pixels)
    finally:
        handle.remove()
    return seen[0]


def text_widths(lengths: list[int], width: int, text_r: int, layers: int = 3) -> int:
    """Text tokens after the tower: each layer merges min(r, half of the shortest caption's
    mergeable tokens) (BOS + words; EOT and padding never merge)."""
    mergeable = min(lengths) + 1
    n = width
    for _ in range(layers):
        r = min(text_r, mergeable // 2)
        n, mergeable = n - r, mergeable - r
    return n


# ------------------------------------------------------------------ token counts


@pytest.mark.parametrize("k", [NUM_TOKENS, 40, 20, 5])
def test_image_towers_yield_exactly_k_tokens(
    k: int, pixels: torch.Tensor, hf_text: dict, oc_text: torch.Tensor
) -> None:
    hf = crossget.apply(tiny_hf_clip(), CrossGETConfig(visual_tokens=k))
    assert crossget.num_visual_tokens(hf) == k
    out = hf_outputs(hf, pixels, hf_text)
    assert out.vision_model_output.last_hidden_state.shape == (3, k, 32)
    assert out.logits_per_image.shape == (3, 3) and torch.isfinite(out.logits_per_image).all()

    oc = crossget.apply(tiny_open_clip(), CrossGETConfig(visual_tokens=k))
    assert crossget.num_visual_tokens(oc) == k
    assert image_tokens_seen_by_ln_post(oc, pixels) == k
    image, _ = oc_outputs(oc, pixels, oc_text)
    assert image.shape == (3, 16) and torch.isfinite(image).all()


@pytest.mark.parametrize("text_r", [1, 2, 4])
def test_text_towers_merge_the_planned_number_of_tokens(
    text_r: int, pixels: torch.Tensor, hf_text: dict, oc_text: torch.Tensor
) -> None:
    expected = text_widths([7, 4, 9], 12, text_r)
    hf = crossget.apply(tiny_hf_clip(), CrossGETConfig(r=0, text_r=text_r))
    out = hf_outputs(hf, pixels, hf_text)
    text_out = out.text_model_output
    assert text_out.last_hidden_state.shape == (3, expected, 32)
    # Padding is never merged and never attended: the same number of pads survive.
    assert (~text_out.attention_mask).sum(dim=1).tolist() == [3, 6, 1]
    assert torch.equal(text_out.token_size.sum(dim=1), torch.full((3,), 12.0))
    oc = crossget.apply(tiny_open_clip(), CrossGETConfig(r=0, text_r=text_r))
    _, text = oc_outputs(oc, pixels, oc_text)
    assert text.shape == (3, 16) and torch.isfinite(text).all()


def test_eot_is_protected_and_pooled(hf_text: dict) -> None:
    """The pooled feature is the EOT token's final state: a token of size 1 sitting right
    before the (unmerged) padding."""
    model = crossget.apply(tiny_hf_clip(), CrossGETConfig(r=0, text_r=2))
    with torch.no_grad():
        out = model.text_model(**hf_text)
    valid = out.attention_mask
    eot = valid.long().cumsum(dim=1).argmax(dim=1)  # last attendable token
    rows = torch.arange(3)
    assert torch.equal(out.pooler_output, out.last_hidden_state[rows, eot])
    assert torch.equal(out.token_size[rows, eot], torch.ones(3))


def test_padding_never_changes_the_pooled_feature(hf_text: dict, oc_text: torch.Tensor) -> None:
    hf = crossget.apply(tiny_hf_clip(), CrossGETConfig(r=0, text_r=2))
    short = captions([7], 9, bos=BOS, eos=EOS, pad=PAD)
    long = captions([7], 16, bos=BOS, eos=EOS, pad=PAD)
    with torch.no_grad():
        a = hf.get_text_features(input_ids=short, attention_mask=(short != PAD).long())
        b = hf.get_text_features(input_ids=long, attention_mask=(long != PAD).long())
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-5, rtol=1e-5)
    oc = crossget.apply(tiny_open_clip(), CrossGETConfig(r=0, text_r=2))
    first = captions([7], 12, bos=OC_BOS, eos=OC_EOS, pad=0)
    with torch.no_grad():
        alone = oc.encode_text(first)
        padded_more = oc.encode_text(torch.cat([first[:, :10], torch.zeros(1, 2).long()], 1))
    torch.testing.assert_close(alone, padded_more, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ exactness


def test_block_ops_reproduce_the_original_blocks() -> None:
    """With nothing to merge, the adapters' own block runs equal the libraries' forward
    (this checks the q/k/v split of in_proj_weight and the causal/padding mask)."""
    oc = tiny_open_clip()
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(1))
    plan = EncoderPlan(layer_r=(0,))
    causal = oc.attn_mask
    position = torch.arange(12).expand(2, 12)
    state = TokenState(
        x, torch.ones(2, 12), torch.zeros(2, 12, dtype=torch.bool), position=position
    )
    block = oc.transformer.resblocks[0]
    mine, _ = merging_block(open_clip_adapter.block_ops(block), state, r=0, plan=plan)
    with torch.no_grad():
        torch.testing.assert_close(mine.hidden, block(x, attn_mask=causal), atol=1e-5, rtol=1e-5)

    hf = tiny_hf_clip()
    layer = hf.text_model.encoder.layers[0]
    mask = torch.full((12, 12), -torch.inf).triu(1)[None, None].expand(2, 1, 12, 12)
    mine, _ = merging_block(hf_clip_model.clip_layer_ops(layer), state, r=0, plan=plan)
    with torch.no_grad():
        torch.testing.assert_close(mine.hidden, layer(x, mask), atol=1e-5, rtol=1e-5)


def test_text_path_without_merges_matches_the_original(hf_text: dict) -> None:
    """A caption with a single mergeable token never merges: the CrossGET text path (cross
    token, masks, EOT pooling) must then reproduce the original features."""
    ids = captions([0, 0, 3], 10, bos=BOS, eos=EOS, pad=PAD)  # BOS EOS pad... (nothing to merge)
    text = {"input_ids": ids, "attention_mask": (ids != PAD).long()}
    reference = tiny_hf_clip()
    model = crossget.apply(tiny_hf_clip(), CrossGETConfig(r=0, text_r=3))
    with torch.no_grad():
        expected = reference.get_text_features(**text).pooler_output
        out = model.get_text_features(**text)
    assert out.last_hidden_state.shape[1] == 10
    torch.testing.assert_close(out.pooler_output, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config", [CrossGETConfig(r=0), CrossGETConfig(visual_tokens=NUM_TOKENS, text_r=0)]
)
def test_no_merging_is_bit_exact(
    config: CrossGETConfig, pixels: torch.Tensor, hf_text: dict, oc_text: torch.Tensor
) -> None:
    expected = hf_outputs(tiny_hf_clip(), pixels, hf_text)
    out = hf_outputs(crossget.apply(tiny_hf_clip(), config), pixels, hf_text)
    assert torch.equal(out.logits_per_image, expected.logits_per_image)
    image, text = oc_outputs(tiny_open_clip(), pixels, oc_text)
    mine = oc_outputs(crossget.apply(tiny_open_clip(), config), pixels, oc_text)
    assert torch.equal(mine[0], image) and torch.equal(mine[1], text)


def test_remove_is_bit_exact(pixels: torch.Tensor, hf_text: dict, oc_text: torch.Tensor) -> None:
    reference = tiny_hf_clip()
    expected = hf_outputs(reference, pixels, hf_text)
    keys = list(reference.state_dict())
    model = tiny_hf_clip()
    crossget.apply(model, CrossGETConfig(visual_tokens=20, text_r=2))
    crossget.apply(model, CrossGETConfig(r=8, text_r=1))
    assert not torch.equal(
        hf_outputs(model, pixels, hf_text).logits_per_image, expected.logits_per_image
    )
    crossget.remove(model)
    assert type(model) is CLIPModel and type(model.text_model).__name__ == "CLIPTextModel"
    assert list(model.state_dict()) == keys
    assert torch.equal(
        hf_outputs(model, pixels, hf_text).logits_per_image, expected.logits_per_image
    )

    image, text = oc_outputs(tiny_open_clip(), pixels, oc_text)
    oc = crossget.apply(tiny_open_clip(), CrossGETConfig(r=8, text_r=2))
    assert type(oc).__name__ == "CrossGETCLIP"
    assert not torch.equal(oc_outputs(oc, pixels, oc_text)[0], image)
    crossget.remove(oc)
    assert type(oc) is open_clip.model.CLIP
    mine = oc_outputs(oc, pixels, oc_text)
    assert torch.equal(mine[0], image) and torch.equal(mine[1], text)


def test_batch_rows_are_independent(pixels: torch.Tensor, oc_text: torch.Tensor) -> None:
    oc = crossget.apply(tiny_open_clip(), CrossGETConfig(visual_tokens=12))
    image, _ = oc_outputs(oc, pixels, oc_text)
    for row in range(3):
        alone, _ = oc_outputs(oc, pixels[row : row + 1], oc_text[:1])
        torch.testing.assert_close(image[row], alone[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("family", ["hf", "open_clip"])
def test_alignment_loss_trains_both_prompt_sets(
    family: str, pixels: torch.Tensor, hf_text: dict, oc_text: torch.Tensor
) -> None:
    model = tiny_hf_clip() if family == "hf" else tiny_open_clip()
    crossget.apply(model, CrossGETConfig(visual_tokens=20, text_r=2))
    tokens = crossget.cross_tokens(model)
    assert tokens.vision_prompts.shape == (4, 32) and tokens.text_prompts.shape == (3, 32)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in tokens.parameters():
        param.requires_grad_(True)
    with torch.no_grad():  # non-zero prompts so that every layer's merge depends on them
        tokens.vision_prompts.normal_(generator=torch.Generator().manual_seed(1))
        tokens.text_prompts.normal_(generator=torch.Generator().manual_seed(2))
    if family == "hf":
        model(pixel_values=pixels, **hf_text)
    else:
        model.encode_image(pixels), model.encode_text(oc_text)
    loss = crossget.alignment_loss(model)
    assert torch.isfinite(loss) and 0 < loss.item() < np.log(2)
    loss.backward()
    assert tokens.vision_prompts.grad is not None and tokens.vision_prompts.grad.abs().sum() > 0
    assert tokens.text_prompts.grad is not None and tokens.text_prompts.grad.abs().sum() > 0


def test_alignment_needs_both_sides(pixels: torch.Tensor, hf_text: dict) -> None:
    model = crossget.apply(tiny_hf_clip(), CrossGETConfig(visual_tokens=20))
    hf_outputs(model, pixels, hf_text)
    with pytest.raises(RuntimeError, match="text_r > 0"):
        crossget.alignment_loss(model)
    with pytest.raises(ValueError, match="guidance='cross'"):
        crossget.apply(tiny_hf_clip(), CrossGETConfig(r=4, guidance="query"))


def test_save_and_load_round_trip(
    pixels: torch.Tensor, oc_text: torch.Tensor, tmp_path: Path
) -> None:
    oc = crossget.apply(tiny_open_clip(seed=3), CrossGETConfig(r=8, text_r=2))
    with torch.no_grad():
        crossget.cross_tokens(oc).vision_prompts.normal_(generator=torch.Generator().manual_seed(5))
    expected = oc_outputs(oc, pixels, oc_text)
    crossget.save_pretrained(oc, tmp_path)
    fresh = crossget.from_pretrained(tiny_open_clip(seed=3), tmp_path)
    mine = oc_outputs(fresh, pixels, oc_text)
    assert torch.equal(mine[0], expected[0]) and torch.equal(mine[1], expected[1])


# ------------------------------------------------------------------ metrics


def test_retrieval_recall_on_a_hand_made_matrix() -> None:
    # 3 images, 5 captions: captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2.
    owners = [0, 0, 1, 1, 2]
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.0, 0.0],  # image 0: best caption 0 (correct) -> rank 0
            [0.7, 0.0, 0.1, 0.2, 0.6],  # image 1: best correct 0.2; 0.7, 0.6 above -> rank 2
            [0.5, 0.4, 0.3, 0.2, 0.1],  # image 2: its caption is last -> rank 4
        ]
    )
    result = retrieval_recall(similarity, owners, ks=(1, 2, 3, 5))
    assert result["i2t_r1"] == pytest.approx(100 / 3)
    assert result["i2t_r3"] == pytest.approx(200 / 3)
    assert result["i2t_r5"] == pytest.approx(100.0)
    # text -> image ranks (column by column): c0 0.9 is best -> 0; c1 0.1 < 0.4 -> 1;
    # c2 0.1 < 0.8, 0.3 -> 2; c3 0.2 ties image 2's 0.2 (ties count against) -> 1; c4 -> 1
    assert result["t2i_r1"] == pytest.approx(20.0)
    assert result["t2i_r2"] == pytest.approx(80.0)
    assert result["t2i_r3"] == pytest.approx(100.0)
    assert result["rsum"] == pytest.approx(sum(v for k, v in result.items() if k != "rsum"))
    with pytest.raises(ValueError, match="one image per text"):
        retrieval_recall(similarity, owners[:4])


def test_zero_shot_accuracy_on_hand_made_logits() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
    result = zero_shot_accuracy(logits, [0, 1, 1], ks=(1, 2))
    assert result["top1"] == pytest.approx(100 / 3)  # row 2 ties with class 0: a miss
    assert result["top2"] == pytest.approx(100.0)


# ------------------------------------------------------------------ recipe smoke test


def _tiny_hf_folder(folder: Path) -> None:
    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(96)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", BOS), ("</s>", EOS)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tiny_hf_clip().save_pretrained(folder)
    fast.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
    ).save_pretrained(folder)


def test_clip_retrieval_recipe_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    from recipes.clip_retrieval import main

    model_dir, images, out = tmp_path / "model", tmp_path / "images", tmp_path / "run"
    _tiny_hf_folder(model_dir)
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        for j in range(2):
            lines.append(json.dumps({"image": f"{i}.png", "caption": f"w{i} w{j + 10} w{i + 20}"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    common = [
        "--model", str(model_dir), "--images", str(images),
        "--captions", str(tmp_path / "captions.jsonl"), "--output", str(out),
        "--visual-tokens", "20", "--text-r", "1", "--batch-size", "4", "--save-every", "1",
        "--log-every", "1", "--device", "cpu", "--lr", "0.05", "--epochs", "2",
    ]  # fmt: skip
    assert main([*common, "--max-steps", "2"]) == 0
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    saved = crossget.CrossGETConfig.from_pretrained(out / "checkpoint-2")
    assert saved.visual_tokens == 20 and saved.text_r == 1 and saved.alignment_weight == 0.5
    state = torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    assert main([*common, "--max-steps", "3", "--resume"]) == 0
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    from safetensors.torch import load_file

    prompts = load_file(str(out / "checkpoint-3" / "crossget_tokens.safetensors"))
    assert prompts["vision_prompts"].abs().sum() > 0  # trained away from zero
    assert prompts["text_prompts"].abs().sum() > 0


def test_recipe_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from recipes.clip_retrieval import build_parser

    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "--alignment-weight" in capsys.readouterr().out
    _ = clip_pair  # the shared module is part of the public adapters


def test_clip_eval_scores_local_files(tmp_path: Path) -> None:
    from eval.clip_eval import main

    model_dir, images = tmp_path / "model", tmp_path / "images"
    _tiny_hf_folder(model_dir)
    rng = np.random.default_rng(1)
    rows = ["image,caption"]
    for label in ("cat", "red_dog"):
        (images / label).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / label / f"{i}.png")
            rows.append(f"{label}/{i}.png,w{i} w{i + 3}")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "retrieval.json"
    args = ["--model", str(model_dir), "--budgets", "full,r8", "--text-r", "1"]
    assert main(["retrieval", *args, "--images", str(images),
                 "--captions", str(tmp_path / "captions.csv"), "--json", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())["rows"]
    assert [row["budget"] for row in result] == ["full", "r8"]
    assert all(0 <= row["i2t_r1"] <= 100 and row["t2i_r10"] == 100 for row in result)
    out = tmp_path / "zeroshot.json"
    assert main(["zeroshot", *args, "--image-folder", str(images), "--json", str(out)]) == 0
    assert all(0 <= row["top1"] <= 100 for row in json.loads(out.read_text())["rows"])
