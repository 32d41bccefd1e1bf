"""`convert_llm` on a real GGUF file, without the 93 MB SmolLM2 download.

A tiny random Llama is written to GGUF the way llama.cpp's converter writes SmolLM2 (F32 tensors,
q/k rows permuted for llama.cpp's rotary layout, tied embeddings, a byte-level "gpt2" vocabulary)
and read back through `convert_llm`. Every weight must come back bit for bit: the loader only
dequantizes (a no-op for F32) and reverse-permutes (a pure reshape), so any difference is a bug.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from mllm_crossget import pretrained_mini as pm  # noqa: E402

# A byte-level BPE vocabulary ("Ġ" is a space) that spells "hello world" as two tokens.
TOKENS = ["<|endoftext|>", "h", "e", "l", "o", "Ġ", "w", "r", "d"]
TOKENS += ["he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "Ġworl", "Ġworld"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
HELLO, WORLD = TOKENS.index("hello"), TOKENS.index("Ġworld")
HEADS, KV_HEADS, LAYERS = 4, 2, 2
# GGUF stores the epsilon as float32; 2**-16 survives that exactly, so logits can match exactly.
EPS = 2.0**-16

# HF module -> llama.cpp tensor name, per decoder layer.
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A seeded LlamaForCausalLM shaped like SmolLM2 (GQA, tied embeddings), every tensor random
    (norms included), so a tensor landing in the wrong place cannot go unnoticed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(TOKENS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        rms_norm_eps=EPS,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(1.0 if param.ndim == 1 else 0.0, 0.1 if param.ndim == 1 else 0.2)
    return model


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): rotary halves -> interleaved pairs."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_gguf(model: torch.nn.Module, path: Path) -> None:
    """The metadata and tensors llama.cpp writes for a Llama, all F32, no `output.weight` (tied)."""
    config = model.config
    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-smollm2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(TOKENS) - 1))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)

    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _llama_cpp_permute(weight, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = _llama_cpp_permute(weight, config.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _shape(config: object) -> tuple[object, ...]:
    names = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"]
    names += ["num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"]
    names += ["rms_norm_eps", "tie_word_embeddings"]
    return tuple(getattr(config, name) for name in names) + (config.rope_parameters["rope_theta"],)


def test_convert_llm_round_trips_a_llama_cpp_gguf_bit_exactly(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    source = _tiny_llama()
    path = tmp_path / "tiny.gguf"
    _write_gguf(source, path)

    model, tokenizer = pm.convert_llm(path)

    assert type(model) is LlamaForCausalLM
    assert model.dtype == torch.float32
    assert _shape(model.config) == _shape(source.config)
    assert not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    expected, got = dict(source.named_parameters()), dict(model.named_parameters())
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], tensor), name  # q/k included: the permutation is undone

    ids = torch.tensor([[0, HELLO, WORLD, 1, 5, 9, 14, 3, 17, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)

    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer("hello world").input_ids == [HELLO, WORLD]
    assert tokenizer("hello<|endoftext|>").input_ids == [HELLO, 0]  # control token kept whole
    assert tokenizer.decode([HELLO, WORLD]) == "hello world"

    # nothing GGUF is left: it saves and reloads as a stock Llama
    model.save_pretrained(tmp_path / "saved")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, source(ids).logits)


@pytest.mark.parametrize("keep", ["metadata", "tensors"])
def test_truncated_gguf_names_the_file(tmp_path: Path, keep: str) -> None:
    """A partial download cut inside the metadata, or inside the last tensor, must not load."""
    whole = tmp_path / "whole.gguf"
    _write_gguf(_tiny_llama(), whole)
    data = whole.read_bytes()
    path = tmp_path / "cut" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(data[:200] if keep == "metadata" else data[:-4])
    with pytest.raises(pm.PretrainedMiniError, match="cannot load") as error:
        pm.convert_llm(path)
    assert str(path) in str(error.value)
    assert "--force" in str(error.value)  # gguf is installed: the file is at fault
    assert error.value.__cause__ is not None
