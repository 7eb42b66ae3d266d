"""One scoring for every WER/CER: the training log's evaluations and `voxtune eval` agree."""

from __future__ import annotations

import pytest

from voxtune.data.example import SpeechExample
from voxtune.eval.tasks import Question, _figures
from voxtune.metrics import error_rates, normalise, speech_text


def test_case_punctuation_and_tags_do_not_count_as_errors():
    assert error_rates(["Hello there."], ["hello there"]) == {"cer": 0.0, "wer": 0.0, "n": 1}
    assert error_rates(["Hello there."], ["<|lang:en|>Hello, there!"])["wer"] == 0.0
    assert error_rates(["one two three four"], ["one two four"])["wer"] == pytest.approx(0.25)
    assert error_rates(["..."], ["anything"]) == {}  # no words to compare
    assert speech_text("Est-il  Douze ?") == "est il douze" and normalise("  Twelve. ") == "twelve"


def test_the_training_log_scores_transcripts_as_voxtune_eval_does():
    """It fed raw text to jiwer: "Hello there." against "hello there" was WER 1.0 in training."""
    example = SpeechExample(audio=b"", text="Hello there.")
    question = Question(task="transcribe", prompt=[], reference="Hello there.", example=example)
    figures = _figures([(question, "<|lang:en|>hello there")], ["transcribe"])
    assert figures["wer"] == 0.0 and figures["cer"] == 0.0
    assert figures["acc_transcribe"] == 1.0
