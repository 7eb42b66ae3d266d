"""Audio Flamingo 3 (`model_type: audioflamingo3`) and Music Flamingo (`musicflamingo`): a
Whisper-large encoder that ends in 2x average pooling and a LayerNorm, a two-layer MLP
projector and a Qwen2 LM. Music Flamingo is the same model plus rotary time embeddings on the
encoder's output and `<|sound_bos|>` / `<|sound_eos|>` around each clip's placeholders.

- Audio: Whisper log-mel, 128 bins. The processor cuts a clip into windows of the extractor's
  `chunk_length` (30 s: the encoder's positional table holds 1500 frames after its stride-2
  convolution), featurises each window alone, padded to the full window, and stacks the windows
  on the batch axis. `WindowedFrontEnd` featurises them the same way and lays a clip's windows
  side by side on the frame axis; `WindowedEncoder` stacks them on the batch axis again, runs
  the tower with each window's own mask and joins each clip's tokens in window order.
- Tokens: the processor counts them on a clip's summed valid frames,
  n = ((frames - 1) // 2 + 1 - 2) // 2 + 1 (25 a second), which is the sum of the windows' own
  counts because a whole window (3000 frames) gives a whole number of tokens (750).
- Longest clip: the processor's `max_audio_len` in whole windows (600 s for AF3, 1200 s for
  Music Flamingo); a longer clip is refused (the processor would keep its first windows and log
  a warning).
- A clip is written as the processor's chat template writes an audio part (`<sound>` for the
  published checkpoints, read from the template: `template_audio_text`); Music Flamingo's
  processor expands it to `<|sound_bos|>` + `<sound>` x n + `<|sound_eos|>`.
- Music Flamingo's rotary time embeddings rotate each window's frames by their time and the
  window's index within its clip. `MusicFlamingoModel` recovers that index from the runs of
  placeholders in the prompt; here the encoder knows it from the windows it cut.

Shape letters: N clips, K windows, M mel bins, W frames of a window, T' tokens, D width.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from voxtune.audio.features import SAMPLE_RATE
from voxtune.model.architectures.pretrained import (
    FeatureExtractorFrontEnd,
    PretrainedSpeechLM,
    TokenProjector,
    causal_lm_view,
    load_processor,
    load_weights,
    read_config,
)

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

# model_type -> its transformers class.
MODEL_CLASSES = {
    "audioflamingo3": "AudioFlamingo3ForConditionalGeneration",
    "musicflamingo": "MusicFlamingoForConditionalGeneration",
}
WHISPER_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


# ---- audio: windows ------------------------------------------------------------------------


class WindowedFrontEnd(FeatureExtractorFrontEnd):
    """Featurises clips as the Audio Flamingo and GLM-ASR processors do: each clip cut into
    windows of the extractor's `chunk_length` (its `n_samples`), as many whole windows as fit in
    `max_seconds` at most, each window featurised alone and padded to the full window (so its
    padding is the processor's).

    Returns features [N, M, K * W], a clip's windows side by side (K: the most windows of a clip
    in the batch; a shorter clip's missing windows are zeros), and each clip's valid frames [N],
    summed over its windows: one per started hop of the clip.
    """

    def __init__(self, extractor: Any, *, max_seconds: float) -> None:
        super().__init__(extractor, pad_to_max=True)
        self.window_samples = int(extractor.n_samples)
        self.window = self.window_samples // self.hop  # W
        self.max_windows = max(1, int(max_seconds // extractor.chunk_length))  # as the processor counts them
        self.max_frames = self.max_windows * self.window  # sets the processor's longest clip

    def __call__(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        pieces = [self.windows(np.asarray(clip, dtype=np.float32)) for clip in clips]
        out = self.extractor(
            [window for clip in pieces for window in clip],
            sampling_rate=SAMPLE_RATE,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        counts = [len(clip) for clip in pieces]
        most = max(counts)
        rows = []
        for windows in out[self.features_key].float().split(counts):  # [K_i, M, W] each
            side_by_side = windows.permute(1, 0, 2).reshape(windows.shape[1], -1)  # [K_i, M, W] -> [M, K_i * W]
            rows.append(F.pad(side_by_side, (0, (most - len(windows)) * self.window)))
        frames = torch.stack([valid.sum() for valid in out[self.mask_key].sum(-1).split(counts)])
        return torch.stack(rows), frames.long()  # [N, M, K * W], [N]

    def windows(self, clip: np.ndarray) -> list[np.ndarray]:
        """A clip's windows, as the processor cuts them: at least one, at most `max_windows`."""
        starts = range(0, max(len(clip), 1), self.window_samples)
        return [clip[start : start + self.window_samples] for start in starts][: self.max_windows]

    def frames(self, samples: int) -> int:
        """Valid frames of a clip of `samples` samples: one per started hop, within the longest clip."""
        return -(-min(samples, self.max_windows * self.window_samples) // self.hop)


class WindowedEncoder(nn.Module):
    """An audio tower that reads fixed windows, as `SpeechLM` calls an encoder: features
    [N, M, K * W] (a clip's windows side by side, `WindowedFrontEnd`) with valid `frames` [N]
    -> each clip's tokens joined in window order [N, T', D] and their counts [N].

    Subclasses say how the tower reads a stack of windows (`encode_windows`) and how many tokens
    valid frames give (`output_lengths`). The processors count a clip's tokens on its summed
    frames, and a window's own tokens are what the model keeps of it; the two agree when a
    whole window makes whole tokens, which is checked here.

    Raises:
        ValueError: a whole window does not make a whole number of tokens.
    """

    def __init__(self, tower: nn.Module, *, window: int, dim: int) -> None:
        super().__init__()
        self.tower = tower
        self.window = window  # W, frames
        self.dim = dim
        self.max_frames = None  # any number of windows (the front end sets the longest clip)
        one, two = self.output_lengths(torch.tensor([window, 2 * window])).tolist()
        if two != 2 * one:
            raise ValueError(
                f"a window of {window} frames does not make whole tokens ({one} for one window, "
                f"{two} for two), so a clip's count would not be its windows'"
            )

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """Tokens of `frames` valid frames, of a window or (the processor's count) of a clip."""
        raise NotImplementedError

    def encode_windows(self, windows: torch.Tensor, frames: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Windows [K, M, W] with their valid frames [K] and index within their clip [K] ->
        the tower's output [K, W', D] (padding rows included)."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows, window_frames, index, counts = self.split_windows(features, frames)
        hidden = self.encode_windows(windows, window_frames, index)  # [ΣK, W', D]
        tokens = self.output_lengths(window_frames)  # [ΣK]
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None] < tokens[:, None]  # [ΣK, W']
        joined = hidden[valid]  # [ΣT', D]: window by window, so clip by clip
        lengths = torch.stack([t.sum() for t in tokens.split(counts)])  # [N]
        return pad_sequence(joined.split(lengths.tolist()), batch_first=True), lengths  # [N, T', D]

    def split_windows(
        self, features: torch.Tensor, frames: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Every clip's windows stacked on the batch axis, as the processor stacks them: windows
        [ΣK, M, W], their valid frames [ΣK], their index within their clip [ΣK] and the number
        of windows of each clip (at least one)."""
        n, mels, steps = features.shape
        if steps % self.window:
            raise ValueError(f"this encoder reads whole windows of {self.window} frames, got {steps} frames")
        per_clip = (-(-frames // self.window)).clamp(min=1)  # [N]
        # [N, M, K * W] -> [N, M, K, W] -> [N, K, M, W]
        stacked = features.reshape(n, mels, steps // self.window, self.window).transpose(1, 2)
        index = torch.arange(stacked.shape[1], device=features.device).expand(n, -1)  # [N, K]
        used = index < per_clip[:, None]  # [N, K]
        window_frames = (frames[:, None] - index * self.window).clamp(0, self.window)  # [N, K]
        return stacked[used], window_frames[used], index[used], per_clip.tolist()


class AudioFlamingo3Encoder(WindowedEncoder):
    """Audio Flamingo 3's audio tower over 30 s windows (see `WindowedEncoder`)."""

    lora_targets = WHISPER_LAYERS

    def __init__(self, tower: nn.Module) -> None:
        config = cast("PreTrainedConfig", tower.config)
        # The positional table holds one window after the stride-2 convolution.
        super().__init__(tower, window=2 * config.max_source_positions, dim=config.hidden_size)

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """After the stride-2 convolution and the 2x average pooling: 25 tokens a second."""
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1

    def encode_windows(self, windows: torch.Tensor, frames: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(self.window, device=windows.device)[None] < frames[:, None]).long()  # [K, W]
        return self.tower(windows, input_features_mask=mask).last_hidden_state  # [K, W/4, D]


class MusicFlamingoEncoder(AudioFlamingo3Encoder):
    """Music Flamingo's audio tower: Audio Flamingo 3's, then rotary time embeddings on each
    window's output, from the model's `pos_emb` (shared, not copied).

    Args:
        tower: the audio tower.
        rotary: `MusicFlamingoModel.pos_emb`.
        frame_step: seconds per mel frame (`audio_frame_step`).
    """

    def __init__(self, tower: nn.Module, rotary: nn.Module, frame_step: float) -> None:
        super().__init__(tower)
        self.rotary = rotary
        self.token_step = frame_step * 4  # the convolution and the pooling make one token of 4 frames

    def encode_windows(self, windows: torch.Tensor, frames: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        from transformers.models.musicflamingo.modeling_musicflamingo import apply_rotary_time_emb

        hidden = super().encode_windows(windows, frames, index)  # [K, W', D]
        steps = hidden.shape[1]
        # Each token's time in its clip, computed as `MusicFlamingoModel._build_audio_timestamps` does.
        offsets = torch.arange(steps, device=hidden.device, dtype=torch.float32) * self.token_step  # [W']
        timestamps = index[:, None] * steps * self.token_step + offsets  # [K, W']
        cos, sin = self.rotary(timestamps, seq_len=steps)
        return apply_rotary_time_emb(hidden, cos, sin)


# ---- chat ---------------------------------------------------------------------------------


def template_audio_text(processor: Any) -> str:
    """What the processor's chat template writes for an audio part before the processor expands
    it: found by rendering a user turn with a clip before its text and without it.

    Raises:
        ModelLoadError: there is no template, it cannot render a turn with parts, or it writes no
            audio placeholder for a clip.
    """
    from jinja2 import TemplateError

    from voxtune.model.checkpoint import ModelLoadError

    template = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
    text = {"type": "text", "text": "Listen."}

    def render(parts: list[dict]) -> str:
        conversation = [{"role": "user", "content": parts}]
        return processor.tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)

    try:
        with_clip, without = render([{"type": "audio"}, text]), render([text])
    except (TemplateError, TypeError, ValueError) as error:  # no template, or one for text alone
        raise ModelLoadError(f"cannot tell how the processor's chat template writes a clip: {error}") from None
    start = len(os.path.commonprefix([with_clip, without]))
    end = len(os.path.commonprefix([with_clip[start:][::-1], without[start:][::-1]]))
    written = with_clip[start : len(with_clip) - end]
    if processor.audio_token not in written:
        raise ModelLoadError(f"the processor's chat template writes no {processor.audio_token} for an audio part")
    return written


# ---- transcription ------------------------------------------------------------------------

# How Audio Flamingo 3 frames a transcript: `The spoken content of the audio is "<words>".`
FRAMINGS = (
    "The spoken content of the audio is",
    "The transcription of the audio is",
    "The content of the input audio is",
)


def transcription_request(processor: Any, audio: Any) -> list[dict] | None:
    """The conversation the processor's `apply_transcription_request` writes (the clip, then its
    `default_transcription_prompt`), or None when it has no such prompt."""
    prompt = getattr(processor, "default_transcription_prompt", None)
    if prompt is None:
        return None
    return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": prompt}]}]


def unframed(reply: str) -> str:
    """A transcript without Audio Flamingo 3's framing sentence, its final period and its quotes,
    as `AudioFlamingo3Processor.decode(strip_prefix=True)` reads it; on a partial reply, the
    words so far (nothing while the framing is being written, an opening quote dropped)."""
    text = reply.strip()
    for framing in FRAMINGS:
        if framing.startswith(text):
            return ""
        if text.startswith(framing):
            text = text[len(framing) :].strip()
            break
    text = text.removesuffix(".").strip()
    if text[:1] in ("'", '"'):
        text = text[1:-1] if len(text) >= 2 and text[-1] == text[0] else text[1:]
    return text.strip()


class FlamingoSpeechLM(PretrainedSpeechLM):
    """An Audio Flamingo checkpoint in `SpeechLM`'s slots, asked for a transcript with its
    processor's own prompt (Music Flamingo's has none: the plain request) and read without
    the sentence it frames the words in. Its prompt names no language: the model hears it."""

    def transcription_messages(self, audio: Any, language: str | None = None) -> list[dict]:
        return transcription_request(self.hf_processor, audio) or super().transcription_messages(audio, language)

    def read_transcript(self, reply: str) -> tuple[str, str | None]:
        return unframed(reply), None


# ---- loading ------------------------------------------------------------------------------


def load(path: Path, dtype: torch.dtype) -> FlamingoSpeechLM:
    """An Audio Flamingo 3 or Music Flamingo checkpoint directory as a `PretrainedSpeechLM`.

    Raises:
        ModelLoadError: the feature extractor's window is not the encoder's.
    """
    import transformers

    from voxtune.model.checkpoint import ModelLoadError

    model_type = read_config(path)["model_type"]
    processor = load_processor(path)
    model = load_weights(getattr(transformers, MODEL_CLASSES[model_type]), path, dtype)
    inner = model.model
    encoder: AudioFlamingo3Encoder
    if model_type == "musicflamingo":
        encoder = MusicFlamingoEncoder(inner.audio_tower, inner.pos_emb, model.config.audio_frame_step)
    else:
        encoder = AudioFlamingo3Encoder(inner.audio_tower)
    front_end = WindowedFrontEnd(processor.feature_extractor, max_seconds=processor.max_audio_len)
    if front_end.window != encoder.window:
        raise ModelLoadError(
            f"{path}: the feature extractor's window is {front_end.window} frames, the encoder's {encoder.window}"
        )
    audio_text = template_audio_text(processor)
    if model_type == "musicflamingo":  # its processor writes the markers around the expansion
        marked = f"{processor.audio_bos_token}{processor.audio_token}{processor.audio_eos_token}"
        audio_text = audio_text.replace(processor.audio_token, marked)
    return FlamingoSpeechLM(
        architecture=model_type,
        model=model,
        processor=processor,
        encoder=encoder,
        projector=TokenProjector(inner.multi_modal_projector),
        lm=causal_lm_view(model.config.text_config, inner.language_model, model.lm_head),
        front_end=front_end,
        audio_token=processor.audio_token,
        audio_text=audio_text,
    )


# ---- tiny checkpoints ---------------------------------------------------------------------

# The published processors' chat template (convert_audioflamingo3_to_hf.py): ChatML with a
# default system turn; a turn's clip is written before its text, whatever the parts' order.
_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n{system}<|im_end|>\n{% endif %}"
    "{% for m in messages if m['content'] is not none %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% set audio = namespace(found=False) %}{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}{% if c.get('type') == 'audio' or 'audio' in c %}{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}{% set text_buf.v = text_buf.v + c['text'] %}{% endif %}"
    "{% endfor %}{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Default system turns (Music Flamingo's published one is longer; one sentence keeps tiny prompts short).
_SYSTEM = {
    "audioflamingo3": "You are a helpful assistant.",
    "musicflamingo": "You are Music Flamingo, a multimodal assistant for language and music.",
}


def tiny(
    directory: str | os.PathLike,
    *,
    model_type: str | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    encoder_dim: int = 32,
    encoder_layers: int = 2,
    seconds: int = 1,
    seed: int = 0,
    init_std: float = 0.02,
) -> Path:
    """A random Audio Flamingo 3 or Music Flamingo (`model_type`) with its processor, and a
    `seconds`-long window (real checkpoints: 30 s). `init_std` is the weights' initializer range.

    Raises:
        ValueError: `model_type` is not one of the two.
    """
    import transformers
    from transformers import Qwen2Tokenizer, WhisperFeatureExtractor

    from voxtune.model.architectures.tiny import CHATML, byte_tokenizer, save_tiny

    if model_type not in MODEL_CLASSES:
        raise ValueError(f"pass model_type={' or '.join(MODEL_CLASSES)}, got {model_type!r}")
    music = model_type == "musicflamingo"
    named = {"audio_token": "<sound>"}
    if music:
        named |= {"audio_bos_token": "<|sound_bos|>", "audio_eos_token": "<|sound_eos|>"}
    tokenizer = byte_tokenizer(Qwen2Tokenizer, named, CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in named.items()}
    prefix = "MusicFlamingo" if music else "AudioFlamingo3"
    config = getattr(transformers, f"{prefix}Config")(
        audio_config={
            "model_type": "audioflamingo3_encoder",
            "hidden_size": encoder_dim,
            "num_hidden_layers": encoder_layers,
            "num_attention_heads": 2,
            "intermediate_size": 2 * encoder_dim,
            "num_mel_bins": 128,
            "max_source_positions": 50 * seconds,
            "initializer_range": init_std,
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // 2,
            "intermediate_size": 2 * hidden,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
            "initializer_range": init_std,
        },
        **ids,
    )
    extractor = WhisperFeatureExtractor(
        feature_size=128, chunk_length=seconds, sampling_rate=16000, return_attention_mask=True
    )
    chat_template = _TEMPLATE.replace("{system}", _SYSTEM[model_type])
    processor_class = getattr(transformers, f"{prefix}Processor")
    processor = processor_class(feature_extractor=extractor, tokenizer=tokenizer, chat_template=chat_template)
    return save_tiny(getattr(transformers, MODEL_CLASSES[model_type]), config, processor, directory, seed)
