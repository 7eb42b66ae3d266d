"""Scoring text: one normalisation for every WER/CER voxtune reports (the training log's
evaluations and `voxtune eval` alike), and the loose comparison of short replies.

    error_rates(["Hello there."], ["hello there"])   # {"cer": 0.0, "wer": 0.0, "n": 1}
"""

from __future__ import annotations

import re
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


_NUMBER = re.compile(r"\d+(?:,\d{3})*")


def spelled_numbers(text: str, lang: str = "en") -> str:
    """Numbers in digits written out as words in `lang` ("at 404 Main" -> "at four hundred and
    four Main"): a recogniser may write either, and which one is not a mistake of hearing."""
    from num2words import num2words

    return _NUMBER.sub(lambda m: f" {num2words(int(m.group().replace(',', '')), lang=lang)} ", text)


def error_rates(
    references: Sequence[str], hypotheses: Sequence[str], *, numbers_as_words: str | None = None
) -> dict[str, float]:
    """Corpus CER and WER (edits over reference length, summed over clips) of `speech_text`;
    clips whose reference has no words are left out. {} when none is left. With
    `numbers_as_words` (a language code), digits on either side are spelled out first."""
    import jiwer

    if numbers_as_words is not None:
        references = [spelled_numbers(r, numbers_as_words) for r in references]
        hypotheses = [spelled_numbers(h, numbers_as_words) for h in hypotheses]
    pairs = [(speech_text(r), speech_text(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return {}
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    return {"cer": float(jiwer.cer(refs, hyps)), "wer": float(jiwer.wer(refs, hyps)), "n": len(pairs)}
