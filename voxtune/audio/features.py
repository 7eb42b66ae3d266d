"""Whisper-compatible log-mel features in torch.

The numbers match `transformers.WhisperFeatureExtractor(feature_size=n_mels)` called with
`padding=False` (and `truncation=False` for clips over 30 s; it truncates by default): 16 kHz,
a 400-sample periodic Hann window, hop 160, centre reflect padding, power spectrum, the last
STFT frame dropped, slaney mel filters over 0-8000 Hz, `log10(max(mel, 1e-10))`, values floored
at 8 below the clip's maximum, then `(x + 4) / 4`. A clip of S samples gives S // 160 frames.

Whisper's floor depends on the clip's loudest frame, so a frame's value can change when louder
audio comes later: the features of a stream are not those of its beginning. `floor=CAUSAL_FLOOR`
(or any number) floors at a fixed log10 value instead, so each frame depends only on the samples
under its window, and features computed as audio arrives equal the whole clip's (what streaming
encoders need). -7 is Whisper's floor for a clip peaking at 1, the median peak of voxtune's
speech (synthesised, at its usual levels, 0.2-2.0): anything within 70 dB of such a peak is
unchanged, only the quietest bins differ.

Shape letters in comments: B batch, S samples, T frames, F frequency bins, M mels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from voxtune.audio.audio import Audio

__all__ = [
    "SAMPLE_RATE",
    "N_FFT",
    "HOP_LENGTH",
    "MIN_SAMPLES",
    "CAUSAL_FLOOR",
    "mel_filters",
    "log_mel",
    "log_mel_batch",
]

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
# Centre padding reflects n_fft // 2 samples at each end, and a reflection needs strictly more
# samples than it mirrors (torch.stft raises otherwise): 201 samples is the shortest usable clip.
MIN_SAMPLES = N_FFT // 2 + 1

# Whisper's mel filters always span 0-8000 Hz, whatever the sample rate.
_MAX_FREQUENCY = 8000.0
# log10 floor and dynamic range of Whisper's features.
_MEL_FLOOR = 1e-10
_DYNAMIC_RANGE = 8.0
CAUSAL_FLOOR = -7.0  # a fixed log10 floor (see the module docstring)

AudioLike = Audio | np.ndarray | torch.Tensor


# --- mel filters -----------------------------------------------------------------------------


def _hz_to_mel_slaney(hz: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (as librosa and transformers)."""
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, 27.0 / math.log(6.4)
    linear = 3.0 * hz / 200.0
    log = min_log_mel + torch.log(hz.clamp(min=min_log_hz) / min_log_hz) * logstep
    return torch.where(hz >= min_log_hz, log, linear)


def _mel_to_hz_slaney(mel: torch.Tensor) -> torch.Tensor:
    """Inverse of `_hz_to_mel_slaney`."""
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, math.log(6.4) / 27.0
    linear = 200.0 * mel / 3.0
    log = min_log_hz * torch.exp(logstep * (mel.clamp(min=min_log_mel) - min_log_mel))
    return torch.where(mel >= min_log_mel, log, linear)


@functools.lru_cache(maxsize=32)
def _mel_filters_cached(
    n_mels: int, sample_rate: int, n_fft: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    # Built in float64 on the CPU and cast once at the end, the way transformers builds them,
    # so the float32 filters agree with its float64 ones to float32 rounding.
    f64 = torch.float64
    mel_edges = torch.linspace(
        _hz_to_mel_slaney(torch.tensor(0.0, dtype=f64)).item(),
        _hz_to_mel_slaney(torch.tensor(_MAX_FREQUENCY, dtype=f64)).item(),
        n_mels + 2,
        dtype=f64,
    )
    hz_edges = _mel_to_hz_slaney(mel_edges)  # [M + 2]: each filter's left edge, centre, right edge
    fft_hz = torch.linspace(0, sample_rate // 2, n_fft // 2 + 1, dtype=f64)  # [F]

    # Triangles: rising from edge m to centre m+1, falling from centre m+1 to edge m+2.
    widths = hz_edges.diff()  # [M + 1]
    slopes = hz_edges[None, :] - fft_hz[:, None]  # [F, M + 2]
    down = -slopes[:, :-2] / widths[:-1]  # [F, M]
    up = slopes[:, 2:] / widths[1:]  # [F, M]
    weights = torch.minimum(down, up).clamp(min=0.0)  # [F, M]

    # Slaney area normalisation: each triangle gets (roughly) the same energy.
    weights = weights * (2.0 / (hz_edges[2:] - hz_edges[:-2]))[None, :]
    filters = weights.T.contiguous().to(device=device, dtype=dtype)  # [M, F]
    # A cached tensor is shared by every caller; making it read-only would need a copy per use,
    # so it is documented as read-only instead.
    return filters


def mel_filters(
    n_mels: int,
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Whisper's mel filter bank, shape `[n_mels, n_fft // 2 + 1]` (slaney scale and norm, 0-8000 Hz).

    Equal to transformers' `mel_filter_bank(..., norm="slaney", mel_scale="slaney").T`.
    The result is cached per arguments and shared: do not modify it in place.
    """
    if n_mels < 1:
        raise ValueError(f"n_mels must be at least 1, got {n_mels}")
    if n_fft < 2:
        raise ValueError(f"n_fft must be at least 2, got {n_fft}")
    if sample_rate < 2 * _MAX_FREQUENCY:
        raise ValueError(
            f"Whisper's mel filters reach {_MAX_FREQUENCY:.0f} Hz, so sample_rate must be at least "
            f"{2 * _MAX_FREQUENCY:.0f}, got {sample_rate}"
        )
    return _mel_filters_cached(n_mels, sample_rate, n_fft, torch.device(device or "cpu"), dtype)


@functools.lru_cache(maxsize=8)
def _hann_window(device: torch.device) -> torch.Tensor:
    # Periodic Hann, as torch.hann_window's default and transformers' window_function("hann").
    return torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=device)


# --- inputs ----------------------------------------------------------------------------------


def _as_samples(audio: AudioLike, what: str) -> torch.Tensor | np.ndarray:
    """One clip as 1-D float32 samples at 16 kHz (numpy or torch, not yet moved), validated."""
    if isinstance(audio, Audio):
        audio = audio.resample(SAMPLE_RATE).samples
    if isinstance(audio, torch.Tensor):
        if not audio.is_floating_point():
            raise ValueError(f"{what}: samples must be floating point in [-1, 1], got {audio.dtype}")
        samples: torch.Tensor | np.ndarray = audio.detach()
    elif isinstance(audio, np.ndarray):
        if not np.issubdtype(audio.dtype, np.floating):
            raise ValueError(f"{what}: samples must be floating point in [-1, 1], got {audio.dtype}")
        samples = audio
    else:
        raise ValueError(f"{what}: expected an Audio, a numpy array or a torch tensor, got {type(audio).__name__}")
    if samples.ndim != 1:
        raise ValueError(f"{what}: samples must be 1-D (mono), got shape {tuple(samples.shape)}")
    if samples.shape[0] == 0:
        raise ValueError(f"{what}: audio is empty")
    if samples.shape[0] < MIN_SAMPLES:
        raise ValueError(
            f"{what}: audio has {samples.shape[0]} samples; at least {MIN_SAMPLES} are needed "
            f"(more than n_fft // 2 = {N_FFT // 2} for the STFT's reflect padding)"
        )
    return samples


def _default_device(clips: Sequence[torch.Tensor | np.ndarray]) -> torch.device:
    """Where to compute when the caller names no device: the first tensor's, else the CPU."""
    for clip in clips:
        if isinstance(clip, torch.Tensor):
            return clip.device
    return torch.device("cpu")


# --- features --------------------------------------------------------------------------------


# Most padded samples (rows x longest row) one batched STFT may hold. On CPU, big batches lose:
# their intermediates (about 30 bytes a sample) fall out of cache and each call page-faults
# fresh buffers, so one 32 x 1-30 s STFT ran ~4x slower than 32 single ones on the same data
# (2 threads); chunks of ~2^19 samples (a 30 s clip alone, shorter ones grouped) ran fastest.
# On CUDA one launch for the lot is what pays, so the cap there only bounds memory
# (2^26 samples, ~2 GB of intermediates).
_CPU_CHUNK_SAMPLES = 1 << 19
_CUDA_CHUNK_SAMPLES = 1 << 26


def _chunks(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Clip indices grouped shortest first, each group's rows x longest row within `budget`.

    Sorting keeps rows of similar length together, so little of each STFT is padding. A clip
    over the budget on its own still gets a group of one.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        # Ascending order: the clip being added is the group's longest.
        if groups and (len(groups[-1]) + 1) * lengths[i] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _log_mel_rows(
    clips: Sequence[torch.Tensor | np.ndarray],
    lengths: Sequence[int],
    n_mels: int,
    device: torch.device,
    fixed_floor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features `[B, M, T]` (T from the longest clip; floor-filled past each clip's end) and
    each row's floor value `[B]`, from one batched STFT. The floor is Whisper's per-clip one, or
    `fixed_floor` (log10) when given."""
    batch, s_max, pad = len(clips), max(lengths), N_FFT // 2

    # Each row holds its clip reflect-padded by `pad` at both ends, then zeros up to a common
    # length. torch.stft(center=True) would reflect the batch's zeros into short rows' right
    # edges, so the padding is built here and the STFT runs with center=False. The rows are
    # staged where the data already is (one host-to-device copy for numpy input).
    all_on_device = all(isinstance(c, torch.Tensor) and c.device == device for c in clips)
    staging = device if all_on_device else torch.device("cpu")
    signal = torch.zeros(batch, s_max + 2 * pad, dtype=torch.float32, device=staging)  # [B, S + 2p]
    for row, clip in enumerate(clips):
        if isinstance(clip, np.ndarray):
            # Through numpy: converts any float dtype, and takes read-only arrays (decoded
            # buffers often are) without torch.from_numpy's warning. Staging is the CPU here.
            signal.numpy()[row, pad : pad + clip.shape[0]] = clip
        else:
            signal[row, pad : pad + clip.shape[0]] = clip.to(device=staging, dtype=torch.float32)
    signal = signal.to(device, non_blocking=True)

    # Left edge: sample k mirrors sample pad - k, the same offsets for every row.
    signal[:, :pad] = signal[:, pad + 1 : 2 * pad + 1].flip(-1)
    # Right edge: after the last sample x[n-1], the padding is x[n-2], x[n-3], ... x[n-1-pad],
    # at a different offset per row, so it is gathered and scattered with [B, pad] indices.
    n = torch.tensor(lengths, dtype=torch.int64, device=device)[:, None]  # [B, 1]
    k = torch.arange(pad, device=device)[None, :]  # [1, pad]
    src = pad + n - 2 - k  # [B, pad]: positions in `signal` of x[n-2-k]
    dst = pad + n + k  # [B, pad]
    signal.scatter_(1, dst, signal.gather(1, src))

    spec = torch.stft(
        signal,
        N_FFT,
        HOP_LENGTH,
        window=_hann_window(device),
        center=False,
        return_complex=True,
    )  # [B, F, T + 1]
    # Whisper drops the last frame; contiguous so the mel matmul takes its fast path.
    # (abs then square, as transformers does, keeps the two bit-for-bit alike on CPU.)
    power = spec[..., :-1].abs().pow(2).contiguous()  # [B, F, T]
    mel = mel_filters(n_mels, device=device) @ power  # [M, F] @ [B, F, T] -> [B, M, T]
    log_spec = mel.clamp(min=_MEL_FLOOR).log10()

    # The per-clip maximum must ignore frames past the clip's end (built from zero padding).
    frames = n // HOP_LENGTH  # [B, 1]
    valid = torch.arange(log_spec.shape[-1], device=device)[None, :] < frames  # [B, T]
    valid = valid[:, None, :]  # [B, 1, T]
    if fixed_floor is None:
        peak = log_spec.masked_fill(~valid, -math.inf).amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]
        floor = peak - _DYNAMIC_RANGE
    else:
        floor = torch.full((batch, 1, 1), fixed_floor, dtype=log_spec.dtype, device=device)
    log_spec = torch.where(valid, torch.maximum(log_spec, floor), floor)
    return (log_spec + 4.0) / 4.0, ((floor + 4.0) / 4.0).view(batch)


def log_mel_batch(
    audios: Sequence[AudioLike],
    n_mels: int = 80,
    *,
    device: torch.device | str | None = None,
    floor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper log-mel features of several clips, in batched STFTs.

    Returns `(features, frames)`: features `[B, n_mels, T_max]` float32 and frames `[B]` int64
    (`samples // 160` per clip), both on `device` (default: the first input tensor's device, else
    CPU). Row b over its first `frames[b]` frames equals `log_mel(audios[b])`; the frames after
    are filled with that clip's floor value, `(max - 8 + 4) / 4`, which is what silence looks
    like to a Whisper encoder. Numpy arrays and tensors are taken to be 16 kHz; `Audio` at
    another rate is resampled. Clips are grouped by length into as few STFTs as the device's
    chunk budget allows (on CUDA usually one). `floor` (log10, e.g. `CAUSAL_FLOOR`) replaces
    the per-clip floor with a fixed one (see the module docstring).
    """
    if isinstance(audios, (np.ndarray, torch.Tensor, Audio)):
        raise ValueError("log_mel_batch takes a sequence of clips; use log_mel for a single clip")
    if len(audios) == 0:
        raise ValueError("log_mel_batch: no clips given")
    clips = [_as_samples(a, f"clip {i}") for i, a in enumerate(audios)]
    device = torch.device(device) if device is not None else _default_device(clips)
    lengths = [int(c.shape[0]) for c in clips]
    frames = torch.tensor(lengths, dtype=torch.int64, device=device) // HOP_LENGTH  # [B]

    budget = _CUDA_CHUNK_SAMPLES if device.type == "cuda" else _CPU_CHUNK_SAMPLES
    groups = _chunks(lengths, budget)
    if len(groups) == 1:  # all in one STFT, already in the caller's order
        features, _ = _log_mel_rows(clips, lengths, n_mels, device, floor)
        return features, frames

    features = torch.empty(len(clips), n_mels, max(lengths) // HOP_LENGTH, dtype=torch.float32, device=device)
    for group in groups:
        part, filler = _log_mel_rows(
            [clips[i] for i in group], [lengths[i] for i in group], n_mels, device, floor
        )  # [b, M, T_group], [b]
        rows = torch.tensor(group, device=device)
        features[rows, :, : part.shape[-1]] = part
        features[rows, :, part.shape[-1] :] = filler[:, None, None]
    return features, frames


def log_mel(
    audio: AudioLike,
    n_mels: int = 80,
    *,
    device: torch.device | str | None = None,
    floor: float | None = None,
) -> torch.Tensor:
    """Whisper log-mel features of one clip, shape `[n_mels, samples // 160]` float32.

    `audio` is an `Audio` (resampled to 16 kHz if needed) or 1-D float samples at 16 kHz as a
    numpy array or torch tensor, with at least 201 samples. Computed on `device` (default: the
    tensor's device, else CPU). `floor`: a fixed log10 floor instead of Whisper's per-clip one.
    """
    if isinstance(audio, (list, tuple)):
        raise ValueError("log_mel takes one clip; use log_mel_batch for several")
    features, _ = log_mel_batch([audio], n_mels, device=device, floor=floor)
    return features[0]
