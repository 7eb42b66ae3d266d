"""Voice perturbation: each clip another speaker and recording chain, measurably, reproducibly,
and only in the splits asked for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from voxtune.audio import Audio
from voxtune.audio.prosody import pitch
from voxtune.audio.voices import EspeakBackend, synthesize
from voxtune.data.perturb import PerturbConfig, clip_rng, draw, equalise, perturb
from voxtune.data.synth import SynthRecipe, synthesize_corpus

ALWAYS = PerturbConfig(prob=1.0, eq_prob=1.0, codec_prob=1.0, reverb_prob=1.0, noise_prob=1.0)


@pytest.fixture(scope="module")
def speech() -> Audio:
    text = "The weather is lovely today. Shall we walk to the river?"
    return synthesize(text, "en", "m3", backend=EspeakBackend()).resample(16000)


def test_draws_are_per_clip_reproducible_and_within_the_ranges():
    first = draw(ALWAYS, "train", clip_rng(7, "clip-1"))
    assert first == draw(ALWAYS, "train", clip_rng(7, "clip-1"))
    assert first != draw(ALWAYS, "train", clip_rng(7, "clip-2"))
    assert draw(ALWAYS, "test", clip_rng(7, "clip-1")) is None  # not a perturbed split
    assert draw(PerturbConfig(), "train", clip_rng(7, "clip-1")) is None  # off by default
    for i in range(50):
        params = draw(ALWAYS, "train", clip_rng(1, str(i)))
        assert ALWAYS.formant[0] <= params["formant"] <= ALWAYS.formant[1]
        assert ALWAYS.tempo[0] <= params["tempo"] <= ALWAYS.tempo[1]
        assert abs(12 * np.log2(params["pitch"])) <= ALWAYS.pitch_semitones + 1e-3
        assert {"eq", "codec", "rt60", "noise", "snr_db"} <= set(params)
    shares = [draw(PerturbConfig(prob=0.3), "train", clip_rng(2, str(i))) is not None for i in range(400)]
    assert 0.22 < np.mean(shares) < 0.38


def test_the_speaker_moves_pitch_rate_and_vocal_tract(speech):
    plain = {"seed": 1, "formant": 1.0, "pitch": 1.0, "tempo": 1.0}
    higher = perturb(speech, {**plain, "pitch": 2 ** (2 / 12)})
    assert np.nanmedian(pitch(higher)) == pytest.approx(2 ** (2 / 12) * np.nanmedian(pitch(speech)), rel=0.05)
    faster = perturb(speech, {**plain, "tempo": 1.08})
    assert faster.duration == pytest.approx(speech.duration / 1.08, rel=0.02)
    # A shorter vocal tract raises the formants, and with them the spectrum's centre of mass.
    shorter, longer = perturb(speech, {**plain, "formant": 1.15}), perturb(speech, {**plain, "formant": 0.9})
    assert _centroid(shorter) > 1.12 * _centroid(longer)
    assert abs(np.abs(shorter.samples).max() - np.abs(speech.samples).max()) < 1e-3  # same recording level


def _centroid(audio: Audio) -> float:
    power = np.abs(np.fft.rfft(audio.samples)) ** 2
    freqs = np.fft.rfftfreq(len(audio.samples), 1 / audio.sample_rate)
    return float((freqs * power).sum() / power.sum())


def test_the_equaliser_boosts_and_cuts_where_asked():
    rng = np.random.default_rng(0)
    noise = Audio(rng.normal(0, 0.05, 32000).astype(np.float32), 16000)
    shaped = equalise(noise, [[1000.0, 8.0, 0.3], [4000.0, -8.0, 0.3]])
    freqs = np.fft.rfftfreq(32000, 1 / 16000)

    def gain(hz: float) -> float:
        """dB of the shaped noise over the noise, within 50 Hz of `hz`."""
        near = np.abs(freqs - hz) < 50
        power = [np.abs(np.fft.rfft(a.samples))[near] ** 2 for a in (shaped, noise)]
        return float(10 * np.log10(power[0].mean() / power[1].mean()))

    assert gain(1000) == pytest.approx(8.0, abs=0.5)
    assert gain(4000) == pytest.approx(-8.0, abs=0.5)
    assert abs(gain(250)) < 0.5


def test_a_corpus_perturbs_only_its_training_clips_and_records_how(tmp_path):
    base = SynthRecipe(
        clips=10,
        languages=["en"],
        kinds={"statement": 1},
        splits={"train": 0.6, "test": 0.4},
        seed=4,
        workers=1,
        chunk_size=10,
    )
    synthesize_corpus(base, tmp_path / "plain")
    synthesize_corpus(base.model_copy(update={"perturb": PerturbConfig(prob=1.0)}), tmp_path / "perturbed")

    def records(name: str, split: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name / f"{split}.jsonl").read_text().splitlines()]

    train = records("perturbed", "train")
    assert train and all("perturb" in r["meta"] for r in train)
    for plain, changed in zip(records("plain", "train"), train, strict=True):
        assert (tmp_path / "plain" / plain["audio"]).read_bytes() != (
            tmp_path / "perturbed" / changed["audio"]
        ).read_bytes()
    # The test split is untouched: the same records and the same bytes as without perturbation.
    assert records("perturbed", "test") == records("plain", "test")
    for record in records("plain", "test"):
        assert (tmp_path / "plain" / record["audio"]).read_bytes() == (
            tmp_path / "perturbed" / record["audio"]
        ).read_bytes()
