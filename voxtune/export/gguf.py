"""A voxtune model with a Whisper encoder as two GGUF files for llama.cpp, written with the `gguf`
package: `model.gguf` (the LM, with its tokenizer and chat template) and `mmproj.gguf` (the audio
encoder and projector, `clip.projector_type = ultravox`), which `llama-server --mmproj` and
`llama-mtmd-cli` read.

LM weights: f32, f16, bf16 or q8_0 (gguf's own quantisers; a row whose length is not a whole
q8_0 block stays f16, norms and biases f32). K-quants (q4_k_m and the like) are what llama.cpp's
`llama-quantize` makes from the f16 file; voxtune does not write them itself.

Architectures: the Llama and Qwen2 families (llama.cpp's `llama` and `qwen2`). llama.cpp rotates
Llama's query and key heads in interleaved pairs where transformers rotates halves, so their
rows are permuted on the way (as llama.cpp's own converter does); Qwen2's rotation is the same
in both. Tokenizers: byte-level BPE with GPT-2's, Llama 3's or Qwen2's pre-tokenizer.

The mmproj is llama.cpp's Ultravox graph: the projector must have its norm in the middle
(`projector_norm_mid`, the default for Whisper-encoder models); llama.cpp has no norm after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
from torch import nn
from transformers import PreTrainedModel

from voxtune.export import ExportError
from voxtune.export.ultravox import check_exportable, ultravox_state
from voxtune.model import SpeechLM

QUANTS = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # transformers model_type -> llama.cpp architecture
# Byte-level BPE pre-tokenizer regexes -> llama.cpp's name for them (`tokenizer.ggml.pre`).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2"}
# llama.cpp's token types.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def write_gguf(model: SpeechLM, directory: Path, quant: str) -> None:
    """Write `model.gguf` and `mmproj.gguf` into `directory`."""
    check_exportable(model, "gguf")
    if quant not in QUANTS:
        raise ExportError(
            f"--quant {quant}: voxtune writes {', '.join(QUANTS)} (K-quants: run llama-quantize on the f16 file)"
        )
    if model.projector.norm_mid is None:
        raise ExportError(
            "--to gguf: this model's projector has its second norm after the MLP (Ultravox v0.4), which "
            "llama.cpp's graph lacks; it exports to --to ultravox, and a model trained with "
            "model.projector_norm_mid=true exports to gguf"
        )
    write_lm_gguf(model, directory / "model.gguf", quant)
    write_mmproj_gguf(model, directory / "mmproj.gguf")


# ---- the LM ------------------------------------------------------------------------------------------


def write_lm_gguf(model: SpeechLM, path: Path, quant: str) -> None:
    """The LM, its tokenizer and chat template as one GGUF file."""
    import gguf

    lm = cast(PreTrainedModel, model.lm)  # a transformers causal LM (an export's has no adapters)
    config = lm.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ExportError(f"--to gguf: voxtune writes GGUF for {', '.join(ARCHITECTURES)} LMs, not {config.model_type}")
    heads, kv_heads = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(path.parent.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[quant]
    )
    _add_tokenizer(writer, model)
    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers
    )
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, tensor in lm.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads the embeddings as the head when there is no output tensor
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"--to gguf: no GGUF name for the LM's tensor {key}")
        data = tensor.detach().float().cpu().numpy()
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            data = _interleave_heads(data, heads if key.endswith("q_proj.weight") else kv_heads)
        _add(writer, name, data, quant)
    _finish(writer)


def _rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0


def _interleave_heads(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q or k projection [heads * head_dim, D] reordered from transformers' rotation
    (first half with second half) to llama.cpp's (neighbouring pairs), head by head."""
    rows = weight.shape[0]
    # [heads, 2, head_dim / 2, D] -> [heads, head_dim / 2, 2, D]: halves interleaved in pairs
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add(writer: Any, name: str, data: np.ndarray, quant: str) -> None:
    """One tensor: 1-D ones (norms, biases) in f32; matrices in `quant`."""
    import gguf

    if data.ndim == 1 or quant == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif quant == "f16" or (
        quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    ):
        writer.add_tensor(name, data.astype(np.float16))
    else:
        kind = gguf.GGMLQuantizationType.BF16 if quant == "bf16" else gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), kind), raw_dtype=kind)


def _add_tokenizer(writer: Any, model: SpeechLM) -> None:
    """The tokenizer as llama.cpp's byte-level BPE ("gpt2") with its pre-tokenizer, special
    tokens and chat template; rows of the embedding past the tokenizer become unused tokens."""
    tokenizer = model.tokenizer
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise ExportError("--to gguf: the tokenizer is not a byte-level BPE, the kind voxtune writes to GGUF")
    embeddings = cast(nn.Embedding, cast(PreTrainedModel, model.lm).get_input_embeddings())
    vocab_size = embeddings.num_embeddings
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, index in tokenizer.get_vocab().items():
        if index >= vocab_size:
            raise ExportError(f"--to gguf: the tokenizer's {text!r} (id {index}) has no row in the LM's embeddings")
        tokens[index], types[index] = text, NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer") or {}))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{role}_token_id")(token_id)
    end_of_turn = model.family.end_of_turn
    if end_of_turn and end_of_turn in tokenizer.get_vocab():
        writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(end_of_turn))
    writer.add_add_bos_token(False)  # the chat template writes it; plain prompts get none, as in transformers
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(spec: dict[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer."""
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    for step in spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else []:
        pattern = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        if pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
    raise ExportError(
        "--to gguf: the tokenizer's pre-tokenizer is not one llama.cpp knows (GPT-2's, Llama 3's or Qwen2's)"
    )


# ---- the audio encoder and projector -----------------------------------------------------------------


def write_mmproj_gguf(model: SpeechLM, path: Path) -> None:
    """The Whisper encoder and the projector as llama.cpp's Ultravox mmproj (f16 matrices)."""
    import gguf

    encoder = model.config.encoder
    layers = int(encoder["encoder_layers"])
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(path.parent.name + " audio")
    writer.add_clip_has_audio_encoder(True)
    writer.add_clip_projector_type("ultravox")
    writer.add_audio_embedding_length(int(encoder["d_model"]))
    writer.add_audio_feed_forward_length(int(encoder["encoder_ffn_dim"]))
    writer.add_audio_block_count(layers)
    writer.add_audio_head_count(int(encoder["encoder_attention_heads"]))
    writer.add_audio_attention_layernorm_eps(1e-5)  # Whisper's LayerNorms
    writer.add_audio_projection_dim(cast(PreTrainedModel, model.lm).config.hidden_size)
    writer.add_audio_num_mel_bins(model.config.n_mels)
    writer.add_audio_stack_factor(model.config.projector_stack)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(layers, 3))  # the projector's linear_1, linear_2
    for key, tensor in ultravox_state(model).items():
        if key.startswith("language_model."):
            continue
        source = "audio." + key if key.startswith("multi_modal_projector.") else key
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"--to gguf: no mmproj name for {key}")
        data = tensor.detach().float().cpu().numpy()
        if ".conv1d." in name:
            # llama.cpp's conv kernels are f16, their biases [C, 1].
            writer.add_tensor(
                name, data.astype(np.float16) if data.ndim == 3 else data.reshape(-1, 1).astype(np.float32)
            )
        elif data.ndim == 1 or "position_embd" in name:
            writer.add_tensor(name, data.astype(np.float32))
        else:
            writer.add_tensor(name, data.astype(np.float16))
    _finish(writer)


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
