"""voxtune.data.augment: each augmentation measured (SNR, spectra, band limits, RT60, speed,
gain), and the seeded `Augmenter` chain (reproducible, recorded).

Run: .venv/bin/python -m pytest -q tests/data/test_augment.py
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from voxtune.audio import Audio, load
from voxtune.audio.prosody import pitch
from voxtune.data.augment import (
    AugmentConfig,
    Augmenter,
    SilentAudioError,
    add_noise,
    babble,
    change_gain,
    change_speed,
    colored_noise,
    g711_decode,
    g711_encode,
    reverb,
    room_impulse_response,
    telephone,
)

RATE = 16000


def speech(seconds: float, seed: int, level: float = 0.4) -> Audio:
    """A speech stand-in, one talker per seed: a gliding harmonic voice (its own pitch and
    speaking rate) under a syllable envelope that drops to pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = rng.uniform(100, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = np.maximum(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 2 * np.pi)), 0)
    samples = syllables * voice + 0.01 * rng.standard_normal(len(t))
    return Audio((level * samples / np.abs(samples).max()).astype(np.float32), RATE)


def measured_snr(clean: np.ndarray, noise: np.ndarray, mix: np.ndarray) -> float:
    """The SNR inside `mix` = a * clean + b * noise, solving for a and b (least squares), so a
    scale-down of the whole mix (to stay within full scale) is accounted for."""
    noise = np.resize(noise.astype(np.float64), len(clean))  # as add_noise loops it
    basis = np.stack([clean.astype(np.float64), noise], axis=1)
    (a, b), *_ = np.linalg.lstsq(basis, mix.astype(np.float64), rcond=None)
    return 10 * np.log10(np.sum((a * clean) ** 2) / np.sum((b * noise) ** 2))


def band_energy(samples: np.ndarray, rate: int, low: float, high: float) -> float:
    power = np.abs(np.fft.rfft(samples.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(samples), 1 / rate)
    return float(power[(freqs >= low) & (freqs < high)].sum())


def schroeder_rt60(rir: np.ndarray, rate: int, top_db: float = -5, bottom_db: float = -25) -> float:
    """RT60 from the Schroeder backward-integrated decay curve, a line fitted from `top_db` to
    `bottom_db` (T20 by default) and extrapolated to 60 dB."""
    energy = np.cumsum((rir.astype(np.float64) ** 2)[::-1])[::-1]
    decay_db = 10 * np.log10(energy / energy[0])
    fit = np.flatnonzero((decay_db <= top_db) & (decay_db >= bottom_db))
    slope = np.polyfit(fit / rate, decay_db[fit], 1)[0]  # dB per second
    return -60 / slope


def harmonic_tone(f0: float, seconds: float, level: float = 0.3) -> Audio:
    t = np.arange(int(seconds * RATE)) / RATE
    tone = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 5))
    return Audio((level * tone / np.abs(tone).max()).astype(np.float32), RATE)


# ---- additive noise ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noise_file(tmp_path_factory):
    """1.3 s of recorded-like noise (a 50 Hz hum with harmonics, plus hiss) in a 16-bit WAV:
    shorter than the 2 s clips, so add_noise loops it."""
    rng = np.random.default_rng(7)
    t = np.arange(int(1.3 * RATE)) / RATE
    hum = sum(0.1 / k * np.sin(2 * np.pi * 50 * k * t) for k in range(1, 6))
    path = tmp_path_factory.mktemp("noise") / "hum.wav"
    sf.write(path, (hum + 0.02 * rng.standard_normal(len(t))).astype(np.float32), RATE, subtype="PCM_16")
    return path


def make_noise(kind: str, samples: int, rng: np.random.Generator, noise_file) -> np.ndarray | Audio:
    if kind == "babble":
        return babble([speech(1.5, seed) for seed in range(3)], samples, RATE, rng)
    if kind == "recorded":
        return load(noise_file)
    return colored_noise(kind, samples, rng)


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
@pytest.mark.parametrize("kind", ["white", "pink", "brown", "babble", "recorded"])
def test_noise_is_mixed_at_the_asked_snr(kind, snr_db, noise_file):
    clean = speech(2.0, seed=1, level=0.9)  # loud: at low SNRs the mix must be scaled down
    noise = make_noise(kind, len(clean), np.random.default_rng(0), noise_file)
    mixed = add_noise(clean, noise, snr_db)
    assert mixed.sample_rate == RATE and len(mixed) == len(clean)
    assert np.abs(mixed.samples).max() <= 1.0
    noise_samples = noise.samples if isinstance(noise, Audio) else noise
    assert measured_snr(clean.samples, noise_samples, mixed.samples) == pytest.approx(snr_db, abs=0.5)


def test_a_mix_that_would_clip_is_scaled_down_not_clipped():
    clean = speech(1.0, seed=0, level=0.9)
    noise = colored_noise("white", len(clean), np.random.default_rng(0))
    mixed = add_noise(clean, noise, 0.0)
    unscaled = clean.samples + noise * np.sqrt(np.mean(clean.samples**2))
    scale = np.abs(unscaled).max()
    assert scale > 1.0  # the case under test
    assert np.abs(mixed.samples).max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(mixed.samples, unscaled / scale, atol=1e-5)  # one gain, no clipping


def test_silent_signal_or_noise_is_refused():
    noise = colored_noise("pink", 1000, np.random.default_rng(0))
    with pytest.raises(SilentAudioError):
        add_noise(Audio(np.zeros(1000, np.float32), RATE), noise, 10.0)
    with pytest.raises(SilentAudioError):
        add_noise(speech(0.5, seed=0), np.zeros(1000), 10.0)


@pytest.mark.parametrize(("kind", "slope"), [("white", 0.0), ("pink", -1.0), ("brown", -2.0)])
def test_noise_spectrum_slope(kind, slope):
    noise = colored_noise(kind, 1 << 17, np.random.default_rng(3))
    assert np.sqrt(np.mean(noise.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-4)
    # Averaged Hann-windowed periodogram (Welch); the window's steep side lobes keep the
    # strong low frequencies of brown noise from leaking into the high bins.
    frames = noise.reshape(-1, 4096) * np.hanning(4096)
    power = np.mean(np.abs(np.fft.rfft(frames, axis=1)) ** 2, axis=0)
    freqs = np.fft.rfftfreq(4096)
    fit = slice(8, len(freqs) - 1)  # skip DC and the window's main lobe around it
    measured = np.polyfit(np.log10(freqs[fit]), np.log10(power[fit]), 1)[0]
    assert measured == pytest.approx(slope, abs=0.3)


def test_babble_is_unit_rms_and_uses_several_talkers():
    sources = [speech(1.0, seed) for seed in range(3)]
    out = babble(sources, 3 * RATE, RATE, np.random.default_rng(0), talkers=5)
    assert out.shape == (3 * RATE,)
    assert np.sqrt(np.mean(out.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-4)
    one = babble(sources, 3 * RATE, RATE, np.random.default_rng(0), talkers=1)

    # Summed talkers fill each other's pauses: the envelope of babble is flatter than one voice's.
    def envelope_spread(x):
        frames = x[: len(x) // 400 * 400].reshape(-1, 400).astype(np.float64)
        return np.std(np.sqrt(np.mean(frames**2, axis=1)))

    assert envelope_spread(out) < envelope_spread(one)


# ---- telephone ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["mulaw", "alaw"])
def test_telephone_band_limits_at_the_input_rate(codec):
    wideband = Audio((0.1 * np.random.default_rng(0).standard_normal(2 * RATE)).astype(np.float32), RATE)
    out = telephone(wideband, codec=codec)
    assert out.sample_rate == RATE and len(out) == len(wideband)

    def drop_db(low, high):
        kept = band_energy(out.samples, RATE, low, high) / band_energy(wideband.samples, RATE, low, high)
        return 10 * np.log10(kept)

    assert drop_db(4000, 8000) < -40  # measured about -58 dB
    assert drop_db(50, 200) < -25  # measured about -38 dB: only the G.711 noise floor is left
    assert abs(drop_db(500, 3000)) < 0.5  # the voice band passes


def test_telephone_keeps_odd_lengths_and_other_rates():
    clip = speech(0.7, seed=2)
    odd = Audio(clip.samples[:11111], RATE)
    assert len(telephone(odd)) == 11111
    at_44k = clip.resample(44100)
    out = telephone(at_44k, codec="alaw")
    assert out.sample_rate == 44100 and len(out) == len(at_44k)


@pytest.mark.parametrize("codec", ["mulaw", "alaw"])
def test_g711_quantisation_noise(codec):
    t = np.arange(8000) / 8000
    sine = 10 ** (-10 / 20) * np.sin(2 * np.pi * 1004 * t)  # -10 dBFS, the ITU test tone
    decoded = g711_decode(g711_encode(sine, codec), codec)
    snr = 10 * np.log10(np.sum(sine**2) / np.sum((decoded - sine) ** 2))
    assert 35 < snr < 40  # measured 37.2 (mu-law) and 36.4 (a-law)


@pytest.mark.parametrize(("codec", "subtype"), [("mulaw", "ULAW"), ("alaw", "ALAW")])
def test_g711_matches_libsndfile(codec, subtype):
    """Every 16-bit value through our codec and through libsndfile's G.711 WAV writer and reader."""
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, pcm, 8000, format="WAV", subtype=subtype)
    buffer.seek(0)
    reference = sf.read(buffer, dtype="int16")[0].astype(np.int64)
    ours = np.round(g711_decode(g711_encode(pcm / 32768, codec), codec) * 32768).astype(np.int64)
    differ = ours != reference
    # mu-law agrees everywhere. a-law differs on 127 negative inputs that sit exactly on a
    # decision boundary, which libsndfile sends to the larger magnitude and the ITU/Sun reference
    # to the smaller; ours is never the farther of the two from the input.
    assert differ.sum() == (0 if codec == "mulaw" else 127)
    x = pcm[differ].astype(np.int64)
    assert np.all(x < 0) and np.all(np.abs(ours[differ] - x) <= np.abs(reference[differ] - x))


# ---- reverb ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rt60", [0.3, 0.8])
def test_room_impulse_response_decays_at_the_asked_rt60(rt60):
    for seed in range(3):
        rir = room_impulse_response(RATE, np.random.default_rng(seed), rt60)
        assert rir[0] == 1.0 and np.argmax(np.abs(rir)) == 0  # direct path first
        assert schroeder_rt60(rir, RATE) == pytest.approx(rt60, rel=0.2)  # T20; measured within 6%
        assert schroeder_rt60(rir, RATE, -5, -35) == pytest.approx(rt60, rel=0.2)  # T30


def test_reverb_keeps_length_alignment_and_peak():
    clip = speech(1.0, seed=3)
    out = reverb(clip, room_impulse_response(RATE, np.random.default_rng(0), 0.5))
    assert len(out) == len(clip) and out.sample_rate == RATE
    assert np.abs(out.samples).max() == pytest.approx(np.abs(clip.samples).max(), rel=1e-5)
    # No delay added: the dry signal and the wet one line up best at lag 0.
    lags = range(-50, 51)
    correlation = [np.dot(np.roll(out.samples, -lag), clip.samples) for lag in lags]
    assert lags[int(np.argmax(correlation))] == 0


def test_longer_rt60_smears_a_click_more():
    click = np.zeros(RATE, np.float32)
    click[1600] = 0.8  # at 100 ms

    def late_fraction(rt60):
        wet = reverb(Audio(click, RATE), room_impulse_response(RATE, np.random.default_rng(0), rt60)).samples
        energy = wet.astype(np.float64) ** 2
        return energy[1600 + RATE // 10 :].sum() / energy.sum()  # after the click + 100 ms

    short, long = late_fraction(0.3), late_fraction(0.8)
    assert 0 < short < long
    assert long > 2 * short


# ---- speed and gain ----------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0.9, 1.1, 1.25])
def test_speed_scales_duration_and_pitch(factor):
    tone = harmonic_tone(200.0, 1.0)
    out = change_speed(tone, factor)
    assert out.sample_rate == RATE
    assert out.duration == pytest.approx(1.0 / factor, rel=0.005)
    assert np.nanmedian(pitch(out)) == pytest.approx(200.0 * factor, rel=0.01)


@pytest.mark.parametrize("db", [-6.0, -1.5, 3.0, 6.0])
def test_gain_changes_rms_by_the_asked_db(db):
    tone = harmonic_tone(200.0, 0.5, level=0.3)  # 10.5 dB of headroom
    out = change_gain(tone, db)

    def rms(x):
        return np.sqrt(np.mean(x.astype(np.float64) ** 2))

    assert 20 * np.log10(rms(out.samples) / rms(tone.samples)) == pytest.approx(db, abs=0.01)


def test_gain_past_full_scale_stops_at_the_peak():
    tone = harmonic_tone(200.0, 0.5, level=0.5)
    out = change_gain(tone, 12.0)  # only 6 dB of headroom
    assert np.abs(out.samples).max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(out.samples, tone.samples * 2.0, atol=1e-6)  # scaled, not clipped


# ---- the Augmenter -----------------------------------------------------------------------------

EVERYTHING = dict(noise_prob=1.0, telephone_prob=1.0, reverb_prob=1.0, speed_prob=1.0, gain_prob=1.0)
NOTHING = dict(noise_prob=0.0, telephone_prob=0.0, reverb_prob=0.0, speed_prob=0.0, gain_prob=0.0)


@pytest.fixture(scope="module")
def babble_sources():
    return [speech(1.5, seed) for seed in range(4)]


def test_same_seed_same_output_and_record(babble_sources, noise_file):
    config = AugmentConfig(noise_prob=0.8, telephone_prob=0.5, reverb_prob=0.5, noise_files=[noise_file])
    augment = Augmenter(config, babble_sources)
    clip = speech(1.0, seed=5)
    for seed in range(8):
        first, second = augment(clip, seed), Augmenter(config, babble_sources)(clip, seed)
        assert first[1] == second[1]
        assert np.array_equal(first[0].samples, second[0].samples)
    assert augment(clip, (3, 17))[1] == augment(clip, (3, 17))[1]  # (epoch, index) seeds too


def test_different_seeds_differ(babble_sources):
    augment = Augmenter(AugmentConfig(**EVERYTHING), babble_sources)
    clip = speech(1.0, seed=5)
    records = [augment(clip, seed)[1] for seed in range(5)]
    assert len({tuple(sorted(record.items())) for record in records}) == 5
    assert not np.array_equal(augment(clip, 0)[0].samples, augment(clip, 1)[0].samples)


def test_all_probabilities_zero_is_the_identity():
    clip = speech(1.0, seed=5)
    out, record = Augmenter(AugmentConfig(**NOTHING))(clip, 123)
    assert np.array_equal(out.samples, clip.samples) and out.sample_rate == clip.sample_rate
    assert record == {"channel": "clean"}


def test_record_says_what_was_applied(babble_sources):
    clip = speech(1.0, seed=5)
    out, record = Augmenter(AugmentConfig(**EVERYTHING), babble_sources)(clip, 9)
    assert set(record) == {"speed", "rt60", "noise", "snr_db", "channel", "gain_db"}
    assert record["channel"] in ("telephone-mulaw", "telephone-alaw")
    assert record["noise"] in ("white", "pink", "brown", "babble")
    assert 0.9 <= record["speed"] <= 1.1 and 0.2 <= record["rt60"] <= 0.8 and 0 <= record["snr_db"] <= 20
    assert len(out) == pytest.approx(len(clip) / record["speed"], abs=2)

    only_noise = dict(NOTHING, noise_prob=1.0)
    _, record = Augmenter(AugmentConfig(**only_noise, noise_kinds=("pink",)))(clip, 9)
    assert set(record) == {"noise", "snr_db", "channel"} and record["channel"] == "clean"


@pytest.mark.parametrize("snr_db", [5.0, 15.0])
def test_augmenter_recorded_noise_at_the_recorded_snr(noise_file, snr_db):
    only_noise = dict(NOTHING, noise_prob=1.0)
    config = AugmentConfig(**only_noise, noise_kinds=("recorded",), snr_db=(snr_db, snr_db), noise_files=[noise_file])
    clip = speech(2.0, seed=4, level=0.3)  # quiet, so the mix is not scaled down: noise = out - clip
    out, record = Augmenter(config)(clip, 0)
    expected = {"noise": "recorded", "noise_file": str(noise_file), "snr_db": snr_db, "channel": "clean"}
    assert record == expected
    assert np.abs(out.samples).max() < 1.0
    noise = out.samples.astype(np.float64) - clip.samples
    measured = 10 * np.log10(np.sum(clip.samples.astype(np.float64) ** 2) / np.sum(noise**2))
    assert measured == pytest.approx(snr_db, abs=0.5)


def test_noise_kinds_without_material_are_left_out():
    assert Augmenter(AugmentConfig()).noise_kinds == ("white", "pink", "brown")
    with pytest.raises(ValueError, match="no noise kind"):
        Augmenter(AugmentConfig(noise_kinds=("babble",)))
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(noise_prob=1.5)
    with pytest.raises(ValueError, match="unknown noise kinds"):
        AugmentConfig(noise_kinds=("violet",))


def test_silent_clip_gets_no_noise():
    silence = Audio(np.zeros(RATE, np.float32), RATE)
    out, record = Augmenter(AugmentConfig(**dict(NOTHING, noise_prob=1.0)))(silence, 0)
    assert record == {"channel": "clean"} and not np.any(out.samples)
