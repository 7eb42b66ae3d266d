"""What differs between causal-LM families, keyed by the config's `model_type`.

Only what voxtune needs to know lives here: the chat template to fall back on when a tokenizer
has none, the token that ends a turn, and the linear layers LoRA adapts. Everything else comes
from the checkpoint itself through `transformers`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypedDict

logger = logging.getLogger(__name__)

# Chat templates, prefix-consistent (rendering messages[:i] is a prefix of rendering messages),
# which is what lets the processor find each assistant turn's tokens for label masking.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Gemma has no system role: a system message is its own user-side turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ message['content'] }}{{ eos_token }}{% else %}[INST] {{ message['content'] }} [/INST]{% endif %}"
    "{% endfor %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """One LM family: how it chats and where adapters go."""

    name: str
    chat_template: str
    special_tokens: tuple[str, ...]  # the template's own markers, added to a tokenizer that lacks them
    end_of_turn: str | None  # the token that ends an assistant turn (a stop token); None: eos
    lora_targets: tuple[str, ...] = _ATTENTION_AND_MLP


class _Chat(TypedDict):
    """A family's chat settings, shared by the families that chat alike."""

    chat_template: str
    special_tokens: tuple[str, ...]
    end_of_turn: str | None


_CHATML = _Chat(chat_template=CHATML_TEMPLATE, special_tokens=("<|im_start|>", "<|im_end|>"), end_of_turn="<|im_end|>")
_LLAMA3 = _Chat(
    chat_template=LLAMA3_TEMPLATE,
    special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    end_of_turn="<|eot_id|>",
)
_GEMMA = _Chat(
    chat_template=GEMMA_TEMPLATE, special_tokens=("<start_of_turn>", "<end_of_turn>"), end_of_turn="<end_of_turn>"
)

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", **_LLAMA3),
    "qwen2": Family("qwen2", **_CHATML),
    "qwen3": Family("qwen3", **_CHATML),
    "smollm3": Family("smollm3", **_CHATML),
    "gemma": Family("gemma", **_GEMMA),
    "gemma2": Family("gemma2", **_GEMMA),
    "gemma3_text": Family("gemma3_text", **_GEMMA),
    "mistral": Family("mistral", MISTRAL_TEMPLATE, ("[INST]", "[/INST]"), None),
    "phi3": Family(
        "phi3",
        PHI3_TEMPLATE,
        ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
        "<|end|>",
        lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    ),
}

DEFAULT_FAMILY = Family("default", **_CHATML)
_warned: set[str] = set()


def family_of(model_type: str) -> Family:
    """The family for a config's `model_type`; an unknown one gets ChatML defaults, said once."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type not in _warned:
        _warned.add(model_type)
        logger.warning(
            "voxtune has no entry for LM family %r; using defaults (ChatML template when the "
            "tokenizer has none, LoRA on %s)",
            model_type,
            ", ".join(DEFAULT_FAMILY.lora_targets),
        )
    return DEFAULT_FAMILY
