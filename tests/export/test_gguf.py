"""GGUF exports: the LM runs in llama.cpp (llama-cpp-python) with transformers' greedy text, q8_0
keeps its perplexity, and the mmproj holds every encoder and projector tensor llama.cpp's
Ultravox graph reads, with their values."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from voxtune.export import ExportError, export
from voxtune.export.ultravox import ultravox_state
from voxtune.model import tiny

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python runs the GGUF files")

PROMPT = "the number is four hundred and four"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory):
    """A tiny Whisper-encoder model of each LM family, exported at every precision: (model, {quant: folder})."""
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    model = tiny(request.param, "whisper", seed=5, hidden=64)
    model.save_pretrained(root / "model")
    return model, {q: export(root / "model", "gguf", root / q, quant=q) for q in ("f32", "f16", "q8_0")}


def _llama(folder):
    return llama_cpp.Llama(model_path=str(folder / "model.gguf"), n_ctx=256, logits_all=True, verbose=False)


def _greedy_and_logits(folder, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation of `ids` and its logits over the prompt [len(ids), V]."""
    llm = _llama(folder)
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)])
        out = []
        for _ in range(steps):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return out, logits
    finally:
        llm.close()


def test_llama_cpp_tokenises_and_generates_as_transformers(exported):
    model, folders = exported
    ids = model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model.lm.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
        reference = model.lm(input_ids=torch.tensor([ids])).logits[0].numpy()
    for quant in ("f32", "f16"):
        llm = _llama(folders[quant])
        try:
            assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
        finally:
            llm.close()
        greedy, logits = _greedy_and_logits(folders[quant], ids, 12)
        assert greedy == expected, quant
        assert np.abs(logits - reference).max() < (1e-3 if quant == "f32" else 5e-2), quant


def test_q8_0_keeps_the_perplexity_of_f16(exported):
    model, folders = exported
    text = "seven plus five is twelve and the number is four hundred and four. " * 3
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]

    def perplexity(quant: str) -> float:
        _, logits = _greedy_and_logits(folders[quant], ids, 0)
        log_probs = torch.log_softmax(torch.from_numpy(logits[:-1]), dim=-1)
        return float(torch.exp(-log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()))

    assert abs(perplexity("q8_0") / perplexity("f16") - 1) <= 0.02
    reader = gguf.GGUFReader(str(folders["q8_0"] / "model.gguf"))
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_every_lm_tensor_is_in_the_gguf_with_its_values(exported):
    from voxtune.export.gguf import _interleave_heads

    model, folders = exported
    config = model.lm.config
    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.LLAMA if config.model_type == "llama" else gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers
    )
    state = {
        k: v for k, v in model.lm.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    for quant, tolerance in (("f32", 0.0), ("q8_0", 0.02)):
        tensors = {t.name: t for t in gguf.GGUFReader(str(folders[quant] / "model.gguf")).tensors}
        assert len(tensors) == len(state)
        for key, value in state.items():
            stored = tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))]
            data = np.asarray(gguf.quants.dequantize(stored.data, stored.tensor_type), dtype=np.float32).reshape(
                value.shape
            )
            expected = value.numpy()
            if config.model_type == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_attention_heads if "q_proj" in key else config.num_key_value_heads
                expected = _interleave_heads(expected, heads)
            assert np.abs(data - expected).max() <= tolerance * max(1.0, float(np.abs(expected).max())), (quant, key)


def test_the_mmproj_holds_the_encoder_and_projector_llama_cpp_reads(exported):
    model, folders = exported
    reader = gguf.GGUFReader(str(folders["f16"] / "mmproj.gguf"))
    fields = {name: field for name, field in reader.fields.items()}

    def value(key: str):
        field = fields[key]
        part = field.parts[field.data[0]]
        return bytes(part).decode() if field.types[0] == gguf.GGUFValueType.STRING else part[0]

    assert value("general.architecture") == "clip" and value("clip.projector_type") == "ultravox"
    assert (
        value("clip.has_audio_encoder") and value("clip.audio.projector.stack_factor") == model.config.projector_stack
    )
    assert value("clip.audio.projection_dim") == model.lm.config.hidden_size
    assert value("clip.audio.block_count") == model.config.encoder["encoder_layers"]
    tensors = {t.name: t for t in reader.tensors}
    state = {k: v for k, v in ultravox_state(model).items() if not k.startswith("language_model.")}
    assert len(tensors) == len(state)  # every encoder and projector tensor, nothing else
    assert {
        "mm.a.norm_pre.weight",
        "mm.a.mlp.1.weight",
        "mm.a.norm_mid.weight",
        "mm.a.mlp.2.weight",
        "a.conv1d.1.weight",
        "a.position_embd.weight",
        "a.blk.0.attn_q.weight",
        "a.post_ln.weight",
    } <= set(tensors)
    pairs = {
        "mm.a.mlp.1.weight": "multi_modal_projector.linear_1.weight",
        "a.blk.1.ffn_down.weight": "audio_tower.layers.1.fc2.weight",
        "a.conv1d.2.bias": "audio_tower.conv2.bias",
        "mm.a.norm_mid.weight": "multi_modal_projector.ln_mid.weight",
    }
    for name, key in pairs.items():
        stored = np.asarray(gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type), dtype=np.float32)
        assert np.allclose(stored.reshape(-1), state[key].numpy().reshape(-1), atol=2e-3), name  # f16 rounding


def test_gguf_needs_the_mid_norm_projector_and_a_family_llama_cpp_runs(tmp_path):
    tiny("llama", "whisper", projector_norm_mid=False).save_pretrained(tmp_path / "v04")
    with pytest.raises(ExportError, match="llama.cpp's graph lacks; it exports to --to ultravox"):
        export(tmp_path / "v04", "gguf", tmp_path / "a")
    tiny("gemma3_text", "whisper").save_pretrained(tmp_path / "gemma")
    with pytest.raises(ExportError, match="GGUF for llama, qwen2 LMs, not gemma3_text"):
        export(tmp_path / "gemma", "gguf", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _mtmd_greedy(folder, prompt: str, audio: np.ndarray, steps: int) -> tuple[list[int], list[int]]:
    """llama.cpp's multimodal path (mtmd, through llama-cpp-python's low-level bindings): the
    prompt with `audio` at the media marker, read through the mmproj; returns the audio chunks'
    token counts and the greedy continuation."""
    import ctypes

    mtmd = pytest.importorskip("llama_cpp.mtmd_cpp", reason="this llama-cpp-python has no mtmd bindings")
    llm = llama_cpp.Llama(model_path=str(folder / "model.gguf"), n_ctx=1024, n_batch=512, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads, params.warmup = False, False, 2, False
    context = mtmd.mtmd_init_from_file(str(folder / "mmproj.gguf").encode(), llm._model.model, params)
    samples = (ctypes.c_float * len(audio)).from_buffer_copy(audio.astype(np.float32).tobytes())
    bitmap = mtmd.mtmd_bitmap_init_from_audio(len(audio), samples)
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        assert context and mtmd.mtmd_support_audio(context)
        text = mtmd.mtmd_input_text()
        encoded = prompt.replace("<|audio|>", mtmd.mtmd_default_marker().decode()).encode()
        text.text, text.text_len, text.add_special, text.parse_special = encoded, len(encoded), False, True
        assert mtmd.mtmd_tokenize(context, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        counts = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_AUDIO:
                counts.append(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
        n_past = llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(context, llm._ctx.ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        tokens = []
        for _ in range(steps):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
            tokens.append(int(np.argmax(logits)))
            llama_cpp.llama_decode(
                llm._ctx.ctx, llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(tokens[-1]), 1)
            )
        return counts, tokens
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(context)
        llm.close()


def test_llama_cpp_hears_a_clip_through_the_mmproj_as_voxtune_does(exported):
    """llama.cpp pads every clip into whole 30 s windows and reads them unmasked; voxtune given
    the same clip padded to 30 s reads the same window, and both continue with the same text."""
    from voxtune.audio import Audio, voices

    model, folders = exported
    speech = voices.synthesize("The number is four hundred and four.", "en").samples
    padded = np.zeros(30 * 16000, np.float32)
    padded[: len(speech)] = speech
    messages = [
        {
            "role": "user",
            "content": [{"type": "audio", "audio": Audio(padded, 16000)}, {"type": "text", "text": "what?"}],
        }
    ]
    prompt = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|audio|>what?"}], tokenize=False, add_generation_prompt=True
    )
    counts, tokens = _mtmd_greedy(folders["f32"], prompt, speech, 16)
    assert counts == [model.audio_tokens(len(padded))]  # one 30 s window, as many tokens as voxtune's
    assert model.tokenizer.decode(tokens) == model.generate(messages, max_new_tokens=16)
