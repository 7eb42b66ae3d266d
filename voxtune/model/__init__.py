"""The speech language model: encoders, projector, `SpeechLM`, prompting, generation, checkpoints."""

from voxtune.model.builder import build_speech_lm, compose, prepare_tokenizer
from voxtune.model.checkpoint import ModelLoadError, load, save
from voxtune.model.generation import SamplingError, SamplingParams
from voxtune.model.processor import AudioEmbedding, MessageError, SpeechProcessor
from voxtune.model.projector import Projector
from voxtune.model.registry import FAMILIES, Family, family_of
from voxtune.model.speech_lm import SpeechLM, SpeechLMConfig
from voxtune.model.tiny import tiny

__all__ = [
    "FAMILIES",
    "AudioEmbedding",
    "Family",
    "MessageError",
    "ModelLoadError",
    "Projector",
    "SamplingError",
    "SamplingParams",
    "SpeechLM",
    "SpeechLMConfig",
    "SpeechProcessor",
    "build_speech_lm",
    "compose",
    "family_of",
    "load",
    "prepare_tokenizer",
    "save",
    "tiny",
]
