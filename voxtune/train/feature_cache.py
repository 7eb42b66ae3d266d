"""Cached encoder outputs: with a frozen encoder, each clip is encoded once and read from disk after.

When the encoder does not train, its output for a clip depends only on the clip and the
encoder's weights, so later epochs can skip it. What is cached is the ENCODER output
[T', D_enc], before the projector: the projector trains, so its output changes every step.

- `encoder_fingerprint(encoder)` hashes the weights (and config) once per run; the cache keeps
  each fingerprint in its own folder, so a changed encoder never reads another encoder's entries.
- `clip_key(clip, augmentation, fingerprint)` names one clip's entry: the audio the encoder
  sees (the digest of its samples; a `FileAudio` knows its own, so it is not decoded to be
  looked up), its rate, the augmentation record and the fingerprint.
- `EncoderFeatureCache` stores entries as safetensors files, written atomically; a corrupt
  entry is a miss, never a crash.
- `encode_with_cache` runs the encoder on the misses only; `project` runs the trainable
  projector on the result; `with_cached_audio` does both for a collated batch, so that
  `SpeechLM.forward` takes it unchanged.

Layout on disk: `<directory>/<fingerprint>/<key[:2]>/<key>.safetensors`.

Shape letters: N clips, T' encoder frames, D_enc encoder width, D LM width.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from voxtune.audio.audio import Audio
from voxtune.audio.file_audio import FileAudio, samples_digest
from voxtune.files import write_atomic
from voxtune.model.projector import Projector

if TYPE_CHECKING:
    from voxtune.model.processor import Example
    from voxtune.model.speech_lm import SpeechLM

__all__ = [
    "EncoderFeatureCache",
    "clip_key",
    "encode_with_cache",
    "encoder_fingerprint",
    "project",
    "with_cached_audio",
]

# Bump when what an entry means changes without the encoder changing: the log-mel features,
# the file layout, or what is stored. Both hashes include it, so old entries simply miss.
# 2: clip keys hash the digest of the samples, not the samples.
CACHE_FORMAT = 2

_TENSOR = "encoder_output"
_SUFFIX = ".safetensors"
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ---- hashing --------------------------------------------------------------------------------


def encoder_fingerprint(module: nn.Module, *, config: Any = None) -> str:
    """A sha256 hex digest of an encoder's weights and config: equal digests, equal outputs.

    Hashes every state-dict entry in name order (name, dtype, shape, then the raw bytes), plus
    the class name and the config (`config`, else `module.config` when it has one) as canonical
    JSON. Parameters live on any device; each is copied to the CPU in turn, so memory stays
    bounded by the largest tensor. sha256 runs at about 2 GB/s, so a 100M-parameter float32
    encoder takes ~0.2 s: compute it once per run (when the cache is made), not per batch.

    Args:
        module: the encoder (e.g. `model.encoder`).
        config: its hyper-parameters when the module does not carry them: pass
            `model.config.encoder` for a `SpeechLM`, since some settings (Whisper's activation
            function) change the outputs without showing in the weights.

    Returns:
        64 lowercase hex characters.
    """
    digest = hashlib.sha256()
    config = config if config is not None else getattr(module, "config", None)
    header = {"format": CACHE_FORMAT, "class": type(module).__qualname__, "config": _plain(config)}
    digest.update(_canonical_json(header).encode())
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        if tensor.is_meta:
            raise ValueError(f"cannot fingerprint {name}: it is on the meta device (weights not loaded)")
        # Length-framed, so no two different state dicts hash the same byte stream.
        digest.update(f"{len(name)}:{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def clip_key(clip: Audio, augmentation: dict | None, fingerprint: str) -> str:
    """The cache key of one clip: sha256 of its samples' digest, rate, augmentation record and
    encoder.

    `clip` is what the encoder sees (after augmentation); its samples are hashed
    (`samples_digest`) unless it is a `FileAudio`, which carries their digest. The record is
    hashed as well, as canonical JSON (sorted keys), so that two draws that happen to give the
    same samples but were recorded differently stay apart, and numpy scalars in it hash like
    Python numbers.

    Returns:
        64 lowercase hex characters.
    """
    samples = clip.digest if isinstance(clip, FileAudio) else samples_digest(clip.samples)
    record = _canonical_json(augmentation)
    text = f"{CACHE_FORMAT}:{samples}:{int(clip.sample_rate)}:{len(record)}:{record}:{fingerprint}"
    return hashlib.sha256(text.encode()).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, bfloat16 included), through a CPU copy if needed."""
    flat = tensor.to("cpu").contiguous().reshape(-1)  # reshape: a 0-d tensor cannot change dtype
    return flat.view(torch.uint8).numpy().data


def _plain(value: Any) -> Any:
    """A config as JSON-ready data: dataclasses and `to_dict()` objects become dicts."""
    if value is None or isinstance(value, dict):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"cannot fingerprint a config of type {type(value).__name__}; pass a dict")


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot hash a {type(value).__name__} in an augmentation record or config")


# ---- the cache ------------------------------------------------------------------------------


class EncoderFeatureCache:
    """Encoder outputs on disk, one safetensors file per clip, for one encoder fingerprint.

    Safe to share between threads, processes and ranks: every write goes to a temporary file
    in the entry's folder and is renamed into place, so readers see a whole file or none, and
    two writers of the same key (which write the same bytes) leave one whole file. Each entry
    carries its key and a checksum of its data; a file that is truncated, corrupt or not the
    entry it claims to be is counted in `corrupt`, deleted and reported as a miss.

    Args:
        directory: the cache root; each fingerprint gets a subfolder.
        fingerprint: `encoder_fingerprint(model.encoder, ...)` of the encoder in use.
        max_bytes: stop writing new entries once this process has seen the folder reach this
            size (None: no limit). Entries are never evicted: training reads every clip once
            per epoch, and in that cyclic pattern evicting the oldest entry would throw away
            exactly the one needed next, while keeping a fixed set keeps its hits. The size is
            scanned once here and tracked per process, so several writers can overshoot it by
            what each writes before it sees the others'.

    Attributes:
        hits, misses, corrupt, writes, skipped: counters since construction (`skipped`: entries
            not written because of `max_bytes`).
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str, *, max_bytes: int | None = None) -> None:
        if not _HEX64.fullmatch(fingerprint):
            raise ValueError(f"a fingerprint is 64 lowercase hex characters (encoder_fingerprint), got {fingerprint!r}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be at least 0, got {max_bytes}")
        self.root = Path(directory)
        self.fingerprint = fingerprint
        self.folder = self.root / fingerprint
        self.max_bytes = max_bytes
        self.hits = self.misses = self.corrupt = self.writes = self.skipped = 0
        self._lock = threading.Lock()  # counters and the size estimate; file I/O runs unlocked
        self._bytes = self._scan_size() if max_bytes is not None else 0

    def path(self, key: str) -> Path:
        """Where the entry for `key` lives (whether or not it exists)."""
        if not _HEX64.fullmatch(key):
            raise ValueError(f"a cache key is 64 lowercase hex characters (clip_key), got {key!r}")
        return self.folder / key[:2] / f"{key}{_SUFFIX}"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached encoder output [T', D_enc] for `key` (on the CPU), or None on a miss."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
                identity = _identity(os.fstat(f.fileno()))
        except FileNotFoundError:
            self._count(misses=1)
            return None
        tensor = _decode(data, key, self.fingerprint)
        if tensor is None:
            self._discard(path, identity)
            self._count(misses=1, corrupt=1)
            return None
        self._count(hits=1)
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> bool:
        """Store one clip's encoder output [T', D_enc]; returns False when `max_bytes` is reached."""
        if tensor.ndim != 2:
            raise ValueError(f"an encoder output is [frames, width], got {tuple(tensor.shape)}")
        path = self.path(key)
        tensor = tensor.detach().to("cpu").contiguous()  # a row of a batch is fine: only its bytes are written
        metadata = {
            "format": str(CACHE_FORMAT),
            "key": key,
            "fingerprint": self.fingerprint,
            "sha256": hashlib.sha256(_tensor_bytes(tensor)).hexdigest(),
        }
        data = save_safetensors({_TENSOR: tensor}, metadata=metadata)
        with self._lock:
            if self.max_bytes is not None and self._bytes + len(data) > self.max_bytes:
                self.skipped += 1
                return False
            self._bytes += len(data)
        write_atomic(path, data)
        self._count(writes=1)
        return True

    def prune(self) -> list[str]:
        """Delete the folders of every other fingerprint under `directory`; returns their names.

        Only folders named like a fingerprint are touched, so a cache root shared with other
        files is safe. Another run still using an old fingerprint loses its entries (they are
        re-encoded), nothing worse.
        """
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        for entry in sorted(self.root.iterdir()):
            if entry.name != self.fingerprint and _HEX64.fullmatch(entry.name) and entry.is_dir():
                _rmtree(entry)
                removed.append(entry.name)
        return removed

    def _count(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def _discard(self, path: Path, identity: tuple[int, int]) -> None:
        """Delete a bad entry, unless another writer has already replaced it with a new file."""
        try:
            if _identity(os.stat(path)) == identity:
                path.unlink()
        except FileNotFoundError:
            pass  # another reader deleted it first

    def _scan_size(self) -> int:
        if not self.folder.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.folder.glob(f"*/*{_SUFFIX}"))


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _decode(data: bytes, key: str, fingerprint: str) -> torch.Tensor | None:
    """The tensor in an entry's bytes, or None when they are not a whole, matching entry."""
    try:
        header_length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_length])
        metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
        tensor = load_safetensors(data)[_TENSOR]
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError):
        # ValueError covers bad JSON and bad UTF-8; the rest are safetensors' and torch's ways
        # of refusing a malformed file. All mean "not a valid entry", which is a miss.
        return None
    expected = {"format": str(CACHE_FORMAT), "key": key, "fingerprint": fingerprint}
    if any(metadata.get(name) != value for name, value in expected.items()) or tensor.ndim != 2:
        return None
    # The header checks sizes, not contents: the checksum catches flipped or zeroed bytes.
    if hashlib.sha256(_tensor_bytes(tensor)).hexdigest() != metadata.get("sha256"):
        return None
    return tensor


def _rmtree(path: Path) -> None:
    """Remove a folder tree; files another process removes meanwhile are not an error."""

    def ignore_missing(function: Any, name: str, error: Any) -> None:
        error = error[1] if isinstance(error, tuple) else error  # onerror passes exc_info
        if not isinstance(error, FileNotFoundError):
            raise error

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=ignore_missing)
    else:
        shutil.rmtree(path, onerror=ignore_missing)


# ---- encoding through the cache -------------------------------------------------------------


def encode_with_cache(
    model: SpeechLM,
    clips: Sequence[Audio],
    augmentations: Sequence[dict | None],
    cache: EncoderFeatureCache | None,
) -> list[torch.Tensor]:
    """Each clip's encoder output [T'_i, D_enc], from the cache or, for the misses, the encoder.

    The misses are encoded in one batch, in eval mode and without gradients, and written to the
    cache. A clip that appears twice is encoded once. With `cache=None` every clip is encoded
    (the same path, uncached). The outputs are on the model's device, in the encoder's dtype,
    and carry no gradient.

    Args:
        model: the `SpeechLM` whose featuriser and (frozen) encoder are used.
        clips: the audio the encoder sees (after augmentation).
        augmentations: each clip's augmentation record (None when not augmented).
        cache: the cache, made with this encoder's fingerprint.

    Raises:
        ValueError: the lists differ in length, or the cache is used with an encoder whose
            parameters require gradients (its outputs would go stale as it trains).
    """
    if len(clips) != len(augmentations):
        raise ValueError(f"{len(clips)} clips but {len(augmentations)} augmentation records")
    if cache is not None and any(p.requires_grad for p in model.encoder.parameters()):
        raise ValueError(
            "the encoder has trainable parameters, so cached outputs would go stale; freeze it "
            "(model.encoder.requires_grad_(False)) or train without the feature cache"
        )
    if cache is None:
        keys = [str(i) for i in range(len(clips))]
    else:
        keys = [clip_key(c, a, cache.fingerprint) for c, a in zip(clips, augmentations, strict=True)]
    found: dict[str, torch.Tensor] = {}
    missing: dict[str, Audio] = {}
    for key, clip in zip(keys, clips, strict=True):
        if key in found or key in missing:
            continue
        cached = cache.get(key) if cache is not None else None
        if cached is None:
            missing[key] = clip
        else:
            found[key] = cached.to(model.device)
    if missing:
        pending = list(missing.values())
        if model.device.type == "cuda":
            outputs = _encode(model, pending)
        else:
            # One clip at a time on the CPU: no compute spent on padding, and a lower peak of
            # memory (measured 15-20 MiB less for batches of 8 clips), at the same speed.
            with _onednn(enabled=not _reads_clips_at_their_length(model)):
                outputs = [output for clip in pending for output in _encode(model, [clip])]
        for key, output in zip(missing, outputs, strict=True):
            found[key] = output
            if cache is not None:
                cache.put(key, output)
    return [found[key] for key in keys]


def _reads_clips_at_their_length(model: SpeechLM) -> bool:
    """Whether the encoder is voxtune's streaming one, which takes each clip at its own length
    (Whisper's reads fixed 30 s windows). Pretrained architectures that also read clips at
    their own length keep oneDNN: not measured there."""
    return model.config.encoder_kind == "streaming"


@contextlib.contextmanager
def _onednn(*, enabled: bool) -> Iterator[None]:
    """oneDNN on or off (`torch.backends.mkldnn.enabled`), the other flags unchanged.

    oneDNN builds and caches kernels for every new input shape. An encoder that reads each clip
    at its own length meets a new shape with almost every clip: in the benchmark's first epoch
    (908 clips, `benchmarks/train_throughput.py`) that kept 40-50 MiB more in float32 training
    (22 MiB under bf16) and made the epoch about 1.1x slower. With fixed windows its kernels
    are reused (Whisper tiny.en: 6% faster with oneDNN). A process-wide switch (it gates the
    bf16 matmuls too), held only for the encoder's pass on the training thread; not for
    concurrent use.
    """
    mkldnn = torch.backends.mkldnn
    with mkldnn.flags(
        enabled=enabled,
        deterministic=mkldnn.deterministic,
        allow_tf32=mkldnn.allow_tf32,
        fp32_precision=mkldnn.fp32_precision,
    ):
        yield


@torch.no_grad()
def _encode(model: SpeechLM, clips: list[Audio]) -> list[torch.Tensor]:
    """Run the encoder on a batch of clips, as `SpeechLM.embed_audio` does: one [T'_i, D_enc] each."""
    features, frames = model.featurize([clip.samples for clip in clips])  # [N, M, T], [N]
    training = model.encoder.training
    model.encoder.eval()  # the cached output must not depend on whether the loop is in train mode
    try:
        hidden, lengths = model.encode_features(features, frames)  # [N, T', D_enc]
    finally:
        model.encoder.train(training)
    return [hidden[i, :n] for i, n in enumerate(lengths.tolist())]


def project(model: SpeechLM, encoder_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run the (trainable) projector on per-clip encoder outputs: one [n_i, D] tensor per clip.

    Equals `model.embed_audio(features, frames)` for the same clips: each clip gets
    `projector.output_lengths` of its frames, its last stack zero-padded as in the encoder's
    padded output. voxtune's `Projector` runs over the clips end to end in one row; other
    projectors over a zero-padded batch. Gradients flow to the projector.
    """
    if not encoder_outputs:
        return []
    weight = next(model.projector.parameters(), None)  # none for an identity (Whisper's cross-attention)
    device, dtype = (weight.device, weight.dtype) if weight is not None else (model.device, encoder_outputs[0].dtype)
    lengths = torch.tensor([o.shape[0] for o in encoder_outputs])
    outputs = [o.to(device, dtype) for o in encoder_outputs]
    counts = model.projector.output_lengths(lengths).tolist()
    if isinstance(model.projector, Projector):
        # After stacking, voxtune's projector works row by row: each clip's frames, zero-padded
        # to whole groups of k as in a padded batch, laid end to end give exactly the audio
        # tokens wanted. A padded batch spent 31% of its rows on padding in the benchmark.
        k = model.projector.stack
        frames = torch.cat([F.pad(o, (0, 0, 0, -o.shape[0] % k)) for o in outputs])  # [k * sum n_i, D_enc]
        return list(model.projector(frames[None])[0].split(counts))  # [sum n_i, D] -> [n_i, D] each
    hidden = pad_sequence(outputs, batch_first=True)  # [N, T', D_enc], zeros past each clip
    tokens = model.projector(hidden)  # [N, ceil(T'/k), D]
    return [tokens[i, :n] for i, n in enumerate(counts)]


def with_cached_audio(
    batch: dict[str, Any], model: SpeechLM, examples: Sequence[Example], cache: EncoderFeatureCache | None
) -> dict[str, Any]:
    """A collated batch with its raw clips replaced by their projected embeddings.

    `examples` are the ones `batch` was collated (or packed) from, in order; each raw clip is
    keyed by its samples and the example's `info["augmentation"]` record. The returned batch
    (a shallow copy) has no `audio_features`/`audio_frames`, and every clip in
    `audio_embeddings`, so `model(batch)` skips the encoder and trains the projector.
    """
    clips = [(clip, example.info.get("augmentation")) for example in examples for clip in example.clips]
    flags = batch.get("audio_is_embedding")
    if flags is not None and len(flags) != len(clips):
        raise ValueError(f"the batch has {len(flags)} clips but the examples have {len(clips)}")
    raw = [(clip, record) for clip, record in clips if isinstance(clip, Audio)]
    encoded = encode_with_cache(model, [c for c, _ in raw], [r for _, r in raw], cache) if raw else []
    projected = iter(project(model, encoded))
    out = {key: value for key, value in batch.items() if key not in ("audio_features", "audio_frames")}
    out["audio_embeddings"] = [next(projected) if isinstance(c, Audio) else c.embeddings for c, _ in clips]
    out["audio_is_embedding"] = torch.ones(len(clips), dtype=torch.bool)
    return out
