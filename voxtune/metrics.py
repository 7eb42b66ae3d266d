"""Scoring text: one normalisation for every WER/CER voxtune reports (the training log's
evaluations and `voxtune eval` alike), and the loose comparison of short replies.

    error_rates(["Hello there."], ["hello there"])   # {"cer": 0.0, "wer": 0.0, "n": 1}
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from voxtune.tags import strip_tags


def normalise(text: str) -> str:
    """`text` compared loosely: tags dropped, casefolded, whitespace collapsed, no trailing
    punctuation ("  Twelve. " -> "twelve")."""
    text = " ".join(strip_tags(text).casefold().split())
    end = len(text)
    while end and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[:end]


def speech_text(text: str) -> str:
    """`text` as heard, for CER/WER: tags dropped, casefolded, punctuation removed (apostrophes
    and hyphens inside words become spaces too), whitespace collapsed."""
    text = strip_tags(text).casefold()
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(kept.split())


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus CER and WER (edits over reference length, summed over clips) of `speech_text`;
    clips whose reference has no words are left out. {} when none is left."""
    import jiwer

    pairs = [(speech_text(r), speech_text(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return {}
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    return {"cer": float(jiwer.cer(refs, hyps)), "wer": float(jiwer.wer(refs, hyps)), "n": len(pairs)}
