"""Model-ready batches: a dataset of tokenised examples, length bucketing, and collators.

Each item is drawn reproducibly from (seed, epoch, index): the task from the mixture and the
augmentation, so an epoch can be replayed exactly (resuming training) and the next epoch
sees other draws of the same data.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import soundfile as sf
from torch.utils.data import Dataset, Sampler

from voxtune.audio import Audio, AudioError, load
from voxtune.audio.features import SAMPLE_RATE
from voxtune.audio.file_audio import FileAudio
from voxtune.data.augment import Augmenter
from voxtune.data.example import Segment, SpeechExample
from voxtune.data.tasks import choose_task, make_conversation, text_conversation
from voxtune.model.processor import IGNORE_INDEX, Example, SpeechProcessor


class SpeechDataset(Dataset):
    """Examples -> tokenised training conversations, drawn per (seed, epoch, index).

    Args:
        examples: what to train on (from any reader or the synthesiser).
        processor: the model's processor (tokenizer, chat template, audio token counts).
        mixture: task weights, e.g. {"transcribe": 2, "describe": 1}.
        augmenter: applied to each clip when given.
        seed: fixes every draw.
        distill: also tokenise, for each example with a transcript, the same conversation with
            the transcript in place of the audio (`info["teacher"]`, for distillation).
        reread: a file read before, unchanged since (same inode, size, modification and change
            times), comes back as `FileAudio` without its samples (decoded again only if they
            are read): for a trainer whose encoder outputs come from a cache, which needs only
            each clip's length and digest. Not with an augmenter (its audio differs each time).
    """

    def __init__(
        self,
        examples: Sequence[SpeechExample],
        processor: SpeechProcessor,
        mixture: Mapping[str, float],
        *,
        augmenter: Augmenter | None = None,
        seed: int = 0,
        distill: bool = False,
        reread: bool = False,
    ) -> None:
        self.examples = list(examples)
        self.distill = distill
        self.processor = processor
        self.mixture = dict(mixture)
        self.augmenter = augmenter
        self.seed = seed
        self.epoch = 0
        self._durations: list[float] | None = None
        if reread and augmenter is not None:
            raise ValueError("reread needs the audio unaugmented: an augmenter changes it every epoch")
        self.reread = reread
        self._read: dict[int, tuple[tuple[int, ...], FileAudio]] = {}  # index -> file's stamp, audio

    def __len__(self) -> int:
        return len(self.examples)

    def set_epoch(self, epoch: int) -> None:
        """Draw tasks and augmentations for `epoch` from now on."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> Example:
        source = self.examples[index]
        draw = (self.seed, self.epoch, index)
        audio = self._audio(index, source.audio)
        info: dict[str, Any] = {"index": index}
        segments = source.segments
        if self.augmenter is not None:
            audio, record = self.augmenter(audio, seed=draw)
            info["augmentation"] = record
            if segments and "speed" in record:  # a faster clip is shorter: so are its segments
                segments = segments_scaled(segments, record["speed"])
        example = dataclasses.replace(source, audio=audio, segments=segments)
        task = choose_task(example, self.mixture, np.random.default_rng(draw))
        conversation = make_conversation(example, task)
        encoded = self.processor.encode_messages(conversation, with_labels=True)
        if self.distill and example.text:
            info["teacher"] = self.processor.encode_messages(
                text_conversation(conversation, example.text), with_labels=True
            )
        if example.text:
            info["transcript"] = example.text  # what an auxiliary loss on the audio alone can use (CTC)
        encoded.info.update(info, task=task)
        return encoded

    def _audio(self, index: int, source: Any) -> Audio:
        """Example `index`'s audio at 16 kHz: from paths, bytes and `Audio` alike; a file read
        before, unchanged, without decoding it (`reread`)."""
        if not self.reread or not isinstance(source, (str, os.PathLike)):
            return load(source, SAMPLE_RATE)
        try:
            status = os.stat(source)
        except OSError:
            return load(source, SAMPLE_RATE)  # says what is wrong with the path
        # The change time too: a rewrite that keeps the size and sets the old mtime back (cp -p)
        # still moves it.
        stamp = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
        known = self._read.get(index)
        if known is not None and known[0] == stamp:
            return known[1]
        audio = FileAudio.read(source, SAMPLE_RATE)
        self._read[index] = (stamp, audio.without_samples())
        return audio

    def durations(self) -> list[float]:
        """Each example's duration in seconds, from its labels, its file header, or by decoding."""
        if self._durations is None:
            self._durations = [_duration(e) for e in self.examples]
        return self._durations

    def token_lengths(self) -> list[int]:
        """Estimated tokens per example (audio tokens plus a text allowance), for bucketing."""
        per_second = self.processor.audio_tokens(SAMPLE_RATE)
        return [
            int(d * per_second) + 32 + 2 * len(e.text or "")
            for d, e in zip(self.durations(), self.examples, strict=True)
        ]


def _duration(example: SpeechExample) -> float:
    if isinstance(example.audio, Audio):
        return example.audio.duration
    if "duration" in example.meta:
        return float(example.meta["duration"])
    try:
        return sf.info(str(example.audio)).duration
    except (sf.LibsndfileError, TypeError, RuntimeError):
        try:
            return load(example.audio, SAMPLE_RATE).duration  # formats libsndfile cannot open
        except AudioError:
            return 0.0  # unreadable: __getitem__ will report it properly


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of examples of similar length, within a token budget, shuffled per epoch.

    Sorting by length inside windows of `window` batches keeps padding low while the order of
    batches (and which examples meet) still changes from epoch to epoch.
    """

    def __init__(
        self, lengths: Sequence[int], *, max_tokens: int, max_batch: int = 64, window: int = 50, seed: int = 0
    ) -> None:
        if max_tokens < 1 or max_batch < 1:
            raise ValueError("max_tokens and max_batch must be positive")
        self.lengths = list(lengths)
        self.max_tokens, self.max_batch, self.window, self.seed = max_tokens, max_batch, window, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for `epoch` from now on."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's batches."""
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.lengths))
        span = self.window * self.max_batch
        batches: list[list[int]] = []
        for start in range(0, len(order), span):
            window = sorted(order[start : start + span].tolist(), key=lambda i: self.lengths[i])
            batch: list[int] = []
            for index in window:
                longest = max([self.lengths[i] for i in batch] + [self.lengths[index]])
                if batch and (longest * (len(batch) + 1) > self.max_tokens or len(batch) == self.max_batch):
                    batches.append(batch)
                    batch = []
                batch.append(index)
            if batch:
                batches.append(batch)
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def collator(
    processor: SpeechProcessor, *, pack: bool = False, features: bool = True, row_multiple: int = 1
) -> Callable[[list[Example]], dict[str, Any]]:
    """A DataLoader `collate_fn`: padded batches, or one packed row (padding-free).
    `features=False` skips the log-mel (when the encoder's outputs come from a cache).
    `row_multiple`: a packed row is made up to a multiple of this many positions by one filler
    example (pad tokens, never scored, attending only to itself), so that rows come in fewer
    lengths: kernels that cache per shape then hit their caches."""

    def collate(examples: list[Example]) -> dict[str, Any]:
        rows = examples
        if pack and row_multiple > 1:
            filler = -sum(len(e.input_ids) for e in examples) % row_multiple
            if filler:
                labels = None if examples[0].labels is None else [IGNORE_INDEX] * filler
                rows = [*examples, Example([processor.tokenizer.pad_token_id] * filler, labels)]
        batch = processor.pack(rows, features=features) if pack else processor.collate(examples, features=features)
        batch["tasks"] = [e.info.get("task") for e in examples]
        batch["clips"] = [clip for e in examples for clip in e.clips]  # for audio-seconds counts
        return batch

    return collate


def segments_scaled(segments: Sequence[Segment], factor: float) -> list[Segment]:
    """Segments of a clip played `factor` times faster."""
    return [dataclasses.replace(s, start=s.start / factor, end=s.end / factor) for s in segments]
