"""Batches for training: reproducible draws, length buckets, padded and packed collation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from voxtune.audio import Audio, AudioError, file_audio
from voxtune.audio.file_audio import FileAudio, samples_digest
from voxtune.data import dataset as dataset_module
from voxtune.data.augment import AugmentConfig, Augmenter
from voxtune.data.dataset import LengthBucketSampler, SpeechDataset, collator
from voxtune.data.example import Segment, SpeechExample
from voxtune.model import tiny
from voxtune.model.processor import IGNORE_INDEX


@pytest.fixture(scope="module")
def model():
    return tiny("llama", "streaming")


def _examples(make_signal, count: int = 12) -> list[SpeechExample]:
    rng = np.random.default_rng(0)
    examples = []
    for i in range(count):
        seconds = float(rng.uniform(0.4, 3.0))
        audio = Audio(make_signal(seconds, 16000, seed=i), 16000)
        examples.append(
            SpeechExample(
                audio,
                text=f"clip number {i}",
                language="en",
                style="happy" if i % 2 else "sad",
                intent="statement",
                segments=[Segment(0.0, seconds / 2, "en"), Segment(seconds / 2, seconds, "de")],
            )
        )
    return examples


def test_items_are_reproducible_per_seed_epoch_and_index(model, make_signal):
    augmenter = Augmenter(AugmentConfig(noise_prob=1.0, noise_kinds=("white", "pink"), speed_prob=0.5))
    dataset = SpeechDataset(
        _examples(make_signal),
        model.processor,
        {"transcribe": 1, "describe": 1, "segments": 1},
        augmenter=augmenter,
        seed=4,
    )
    first = [dataset[i] for i in range(len(dataset))]
    again = [dataset[i] for i in range(len(dataset))]
    assert [e.input_ids for e in first] == [e.input_ids for e in again]
    assert all(np.array_equal(a.clips[0].samples, b.clips[0].samples) for a, b in zip(first, again, strict=True))
    dataset.set_epoch(1)
    later = [dataset[i] for i in range(len(dataset))]
    assert [e.info["augmentation"] for e in later] != [e.info["augmentation"] for e in first]
    assert {e.info["task"] for e in first + later} == {"transcribe", "describe", "segments"}
    for example in first:  # every item trains on its reply only
        assert any(label != IGNORE_INDEX for label in example.labels)


def test_speed_changes_scale_the_segments(model, make_signal):
    augmenter = Augmenter(
        AugmentConfig(noise_prob=0, telephone_prob=0, reverb_prob=0, gain_prob=0, speed_prob=1.0, speeds=(1.2, 1.2))
    )
    examples = _examples(make_signal, 1)
    dataset = SpeechDataset(examples, model.processor, {"segments": 1}, augmenter=augmenter)
    item = dataset[0]
    reply = model.tokenizer.decode(
        [i for i, label in zip(item.input_ids, item.labels, strict=True) if label != IGNORE_INDEX]
    )
    end = examples[0].segments[-1].end / 1.2
    assert f"-{end:.2f}<|lang:de|>" in reply
    assert item.clips[0].duration == pytest.approx(examples[0].audio.duration / 1.2, abs=1e-3)


def test_buckets_cover_every_example_once_within_the_budget():
    lengths = list(np.random.default_rng(0).integers(10, 400, size=500))
    sampler = LengthBucketSampler(lengths, max_tokens=2000, max_batch=16, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(max(lengths[i] for i in b) * len(b) <= 2000 or len(b) == 1 for b in batches)
    assert all(len(b) <= 16 for b in batches)
    # Batches hold similar lengths: far less padding than random batches of the same sizes.
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    shuffled = np.random.default_rng(2).permutation(500).tolist()
    random_batches, cursor = [], 0
    for b in batches:
        random_batches.append(shuffled[cursor : cursor + len(b)])
        cursor += len(b)
    random_padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in random_batches)
    assert padding < 0.3 * random_padding
    assert list(sampler) == batches  # same epoch, same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


@pytest.mark.parametrize("pack", [False, True])
def test_a_dataloader_gives_batches_the_model_trains_on(model, make_signal, pack):
    dataset = SpeechDataset(_examples(make_signal), model.processor, {"transcribe": 1, "describe": 1})
    sampler = LengthBucketSampler(dataset.token_lengths(), max_tokens=600, max_batch=4)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator(model.processor, pack=pack))
    seen = 0
    for batch in loader:
        rows = batch["input_ids"].shape[0]
        assert rows == (1 if pack else len(batch["tasks"]))
        if pack:
            # No [L, L] mask on the host: the examples' lengths keep them apart.
            assert batch["attention_mask"].shape == batch["position_ids"].shape == batch["input_ids"].shape
            assert int(batch["sequence_lengths"].sum()) == batch["input_ids"].shape[1]
        loss = model(batch).loss
        assert torch.isfinite(loss)
        seen += len(batch["tasks"])
    assert seen == len(dataset)


def test_a_packed_row_made_up_to_a_multiple_scores_the_same_tokens(model, make_signal):
    from voxtune.model.packed_attention import use_packed_attention
    from voxtune.train.trainer import compute_loss, trained_tokens

    dataset = SpeechDataset(_examples(make_signal, count=3), model.processor, {"transcribe": 1})
    examples = [dataset[i] for i in range(3)]
    exact = collator(model.processor, pack=True)(examples)
    padded = collator(model.processor, pack=True, row_multiple=64)(examples)
    length = exact["input_ids"].shape[1]
    assert length % 64 and padded["input_ids"].shape[1] == length + (-length % 64)
    assert padded["sequence_lengths"].tolist() == [*exact["sequence_lengths"].tolist(), -length % 64]
    assert trained_tokens(padded) == trained_tokens(exact)
    assert padded["tasks"] == exact["tasks"] and len(padded["clips"]) == len(exact["clips"])
    use_packed_attention(model.lm)  # the filler attends only to itself
    with torch.no_grad():
        assert compute_loss(model, padded, 16)[0].item() == pytest.approx(
            compute_loss(model, exact, 16)[0].item(), rel=1e-5
        )


def test_files_read_before_are_not_decoded_again(model, make_signal, tmp_path, monkeypatch):
    examples = []
    for i, example in enumerate(_examples(make_signal, count=3)):
        path = tmp_path / f"{i}.wav"
        sf.write(path, example.audio.samples, 16000, subtype="FLOAT")
        examples.append(dataclasses.replace(example, audio=str(path)))
    dataset = SpeechDataset(examples, model.processor, {"transcribe": 1}, reread=True)
    first = [dataset[i] for i in range(3)]
    decoded: list[str] = []
    for module in (file_audio, dataset_module):
        real = module.load
        monkeypatch.setattr(module, "load", lambda path, rate, real=real: decoded.append(str(path)) or real(path, rate))
    dataset.set_epoch(1)
    later = [dataset[i] for i in range(3)]
    assert decoded == []  # known by their length and digest
    assert [e.input_ids for e in later] == [e.input_ids for e in first]  # as many audio tokens
    clip = later[0].clips[0]
    assert isinstance(clip, FileAudio) and clip.digest == samples_digest(first[0].clips[0].samples)
    np.testing.assert_array_equal(clip.samples, first[0].clips[0].samples)  # read: decoded again
    assert decoded == [str(tmp_path / "0.wav")]
    # A file that changed is read again; one that changed under a FileAudio is refused.
    sf.write(tmp_path / "1.wav", np.zeros(20000, np.float32), 16000, subtype="FLOAT")
    assert len(dataset[1].clips[0]) == 20000
    sf.write(tmp_path / "0.wav", np.zeros(20000, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="changed while it was in use"):
        _ = clip.samples
    # Without reread every item is decoded.
    plain = SpeechDataset(examples, model.processor, {"transcribe": 1})
    decoded.clear()
    items = [plain[2], plain[2]]
    assert not any(isinstance(item.clips[0], FileAudio) for item in items)
    assert decoded == [str(tmp_path / "2.wav")] * 2
    with pytest.raises(ValueError, match="unaugmented"):
        SpeechDataset(examples, model.processor, {"transcribe": 1}, augmenter=Augmenter(AugmentConfig()), reread=True)
