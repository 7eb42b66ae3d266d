"""What the architecture tests share: each test file proves one module of
voxtune/model/architectures/ against its transformers class, and the mechanics of doing so are
the same for all of them.

- inputs: `clip` (seeded noise), `messages` (one user turn: a clip and a question),
  `prompt_batch` and `labelled_batch` (voxtune's batches), `rendered_inputs` and
  `templated_inputs` (the two ways an architecture's own processor is asked);
- against the reference: `assert_same_as_reference` (prompt ids, logits, greedy reply),
  `assert_batched_and_encoded_replies`, `assert_audio_tokens`;
- LoRA: `assert_lora_targets`, `assert_lora_b_gradients`, `assert_encoder_lora`;
- training: `train` (a `voxtune train` recipe, run in-process), `assert_loss_fell`,
  `assert_trained_on_cached_features`, `assert_exports_match` (the merged export and the
  adapters in transformers + peft);
- serving: `serving` (a real server and an openai client on it), `ask_server`, `assert_served`;
- files: `copy_files` (e.g. `WEIGHTS_ONLY`, a checkpoint without its processor files).

A test file keeps what is its architecture's own: how its reference inputs are made, its
module names, its layout's quirks.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from openai import OpenAI
from peft import PeftModel

import voxtune
from voxtune.audio import Audio
from voxtune.audio import load as load_audio
from voxtune.cli import main
from voxtune.infer import Runtime
from voxtune.serve.config import ServeConfig
from voxtune.serve.server import build_runtime, running_server
from voxtune.train.model_setup import prepare_trainable
from voxtune.train.recipe import TrainSection

SAMPLE_RATE = 16000
QUESTION = "What is said?"
# The LM decoder layer's linear layers (Llama-like: attention, then a gated MLP).
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# A Whisper-like encoder layer's linear layers.
WHISPER_ENCODER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
# A checkpoint's weights and configs without its processor files.
WEIGHTS_ONLY = ("config.json", "model.safetensors", "generation_config.json")


# ---- inputs --------------------------------------------------------------------------------


def clip(seconds: float, seed: int = 0) -> Audio:
    """`seconds` of seeded 16 kHz noise (0.1 standard deviation)."""
    rng = np.random.default_rng(seed)
    return Audio((0.1 * rng.standard_normal(int(SAMPLE_RATE * seconds))).astype(np.float32), SAMPLE_RATE)


def messages(audio: Any, text: str = QUESTION) -> list[dict]:
    """One user turn: `audio` (a clip, an encoded clip, a path) then `text`."""
    return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": text}]}]


def labelled_batch(model: Any, conversation: list[dict], reply: str = "hello") -> dict[str, Any]:
    """`conversation` answered with `reply`, encoded with labels and collated: a training batch."""
    turns = conversation + [{"role": "assistant", "content": reply}]
    return model.processor.collate([model.processor.encode_messages(turns, with_labels=True)])


def prompt_batch(model: Any, conversation: list[dict]) -> dict[str, Any]:
    """`conversation` encoded as a prompt (a reply to generate next) and collated."""
    return model.processor.collate([model.processor.encode_messages(conversation, add_generation_prompt=True)])


def rendered_inputs(model: Any, processor: Any, audio: Audio, text: str = QUESTION, **kwargs: Any) -> dict:
    """What the architecture's own `processor` makes of the chat voxtune renders (its audio
    text, then `text`) with `audio`; `kwargs` go to the processor."""
    chat = model.processor._render([{"role": "user", "content": model.processor.audio_text + text}], True)
    return processor(text=chat, audio=[audio.samples], return_tensors="pt", **kwargs)


def templated_inputs(processor: Any, audio: Audio, text: str = QUESTION) -> dict:
    """What the architecture's own `processor` makes of the same chat, rendered by its own template."""
    chat = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": text}]}]
    rendered = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return processor(text=rendered, audio=[audio.samples], return_tensors="pt")


# ---- against the reference -----------------------------------------------------------------


def assert_same_as_reference(
    model: Any, reference: Any, tokenizer: Any, conversation: list[dict], inputs: dict, *, max_new_tokens: int = 8
) -> str:
    """voxtune's prompt ids for `conversation` are the reference's `inputs`, the logits agree
    (1e-4), and greedy decoding gives the reference's reply (decoded by `tokenizer`), which
    is returned."""
    example = model.processor.encode_messages(conversation, add_generation_prompt=True)
    assert example.input_ids == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ours = model(model.processor.collate([example])).logits
        theirs = reference(**inputs).logits
    assert (ours - theirs).abs().max() <= 1e-4
    new = reference.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[
        0, inputs["input_ids"].shape[1] :
    ]
    expected = tokenizer.decode(new, skip_special_tokens=True)
    assert model.generate(conversation, max_new_tokens=max_new_tokens, ignore_eos=False) == expected
    return expected


def assert_batched_and_encoded_replies(
    model: Any,
    conversation: list[dict],
    audio: Audio,
    expected: str,
    *,
    others: list[list[dict]] | None = None,
    max_new_tokens: int = 8,
) -> None:
    """Batched with `others` (default: a 0.7 s clip; left-padded, clips of other lengths),
    `conversation` still gets `expected` and each other its own reply; and `audio` (the clip of
    `conversation`) encoded once stands in for itself."""
    others = others if others is not None else [messages(clip(0.7, seed=1), "And this?")]
    alone = [model.generate(other, max_new_tokens=max_new_tokens) for other in others]
    assert model.generate([conversation, *others], max_new_tokens=max_new_tokens) == [expected, *alone]
    assert model.generate(messages(model.encode_audio(audio)), max_new_tokens=max_new_tokens) == expected


def assert_audio_tokens(model: Any, audio: Audio, expected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """voxtune's placeholder count for `audio`, the rows its encoder gives and `expected` (the
    reference processor's count) agree; returns (the rows, the clip's feature frames)."""
    features, frames = model.featurize([audio.samples])
    (embeddings,) = model.embed_audio(features, frames)
    assert model.audio_tokens(len(audio)) == expected == embeddings.shape[0]
    return embeddings, frames


# ---- LoRA ----------------------------------------------------------------------------------


def lm_layers(prefix: str, names: tuple[str, ...] = ATTENTION + MLP, layers: int = 2) -> set[str]:
    """The full names of the LM's linear layers `names` under `prefix` (e.g.
    "model.language_model.layers"): attention ones under self_attn, the MLP's under mlp."""
    part = {**dict.fromkeys(ATTENTION, "self_attn"), **dict.fromkeys(MLP, "mlp")}
    return {f"{prefix}.{i}.{part[name]}.{name}" for i in range(layers) for name in names}


def targeted(model: Any) -> set[str]:
    """The modules LoRA was put on."""
    return set(model._peft.base_model.targeted_module_names)


def assert_lora_targets(checkpoint: Path, expected: set[str]) -> Any:
    """Default LoRA on `checkpoint` lands on exactly `expected`, and only LoRA's weights train:
    A and B of each target, nothing else (such as the projector). Returns the prepared model."""
    model = voxtune.load(str(checkpoint))
    params = prepare_trainable(model, TrainSection(method="lora"))
    assert targeted(model) == expected
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    assert len(params) == 2 * len(expected)
    return model


def assert_lora_b_gradients(model: Any, batch: dict[str, Any]) -> None:
    """A backward pass on `batch` gives the lora_B weight of every targeted module (one each) a
    non-zero gradient."""
    model(batch).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert len(grads) == len(targeted(model))


def assert_encoder_lora(
    checkpoint: Path,
    tower: set[str],
    lm: set[str],
    *,
    prefix: str = "model.audio_tower.",
    train_projector: bool | None = True,
) -> None:
    """LoRA asked for the encoder too lands on exactly `tower` (the modules under `prefix`) and,
    outside it, on exactly `lm`; with `train_projector` (None: the model's default, which is
    off for a pretrained projector), the projector trains alongside."""
    model = voxtune.load(str(checkpoint))
    section = TrainSection(method="lora", lora={"encoder": True}, train_projector=train_projector)
    prepare_trainable(model, section)
    names = targeted(model)
    in_tower = {name for name in names if name.startswith(prefix)}
    assert in_tower == tower
    assert names - in_tower == lm
    if train_projector:
        projector = list(model.projector.parameters())
        assert projector and all(p.requires_grad for p in projector)


# ---- training ------------------------------------------------------------------------------


def train(
    checkpoint: Path,
    corpus: Path,
    out: Path,
    *,
    max_steps: int = 12,
    max_tokens: int = 2000,
    targets: list[str] | None = None,
    lr: float = 2e-2,
    **train_section: Any,
) -> Path:
    """Write a `voxtune train` recipe for `checkpoint` on `corpus`'s training manifest (LoRA of
    rank 8 on `targets`, default: the model's own; a loss logged every step; no evaluation, no
    checkpoint before the end) into `out`, run it in-process and return its output directory."""
    lora = {"r": 8} if targets is None else {"r": 8, "targets": targets}
    recipe = {
        "model": {"load": str(checkpoint)},
        "data": {"train": [str(corpus / "train.jsonl")]},
        "train": {"max_steps": max_steps, "max_tokens": max_tokens, "log_every": 1, "lora": lora, **train_section},
        "optim": {"lr": lr, "warmup_steps": 1},
        "eval": {"every": 100},
        "output": {"dir": str(out / "run"), "save_every": 100},
    }
    path = out / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    assert main(["train", str(path)]) == 0
    return out / "run"


def losses(run: Path) -> list[float]:
    """The training losses `run` logged, step by step."""
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]


def assert_loss_fell(run: Path, *, window: int = 4, factor: float = 0.9) -> None:
    """The mean loss of the last `window` steps is below `factor` x that of the first."""
    logged = losses(run)
    assert sum(logged[-window:]) / window < factor * sum(logged[:window]) / window


def assert_trained_on_cached_features(run: Path) -> None:
    """A LoRA run on a frozen tower: the loss fell, and the tower's outputs were cached."""
    assert_loss_fell(run)
    assert (run / "encoder_cache").is_dir()


def assert_exports_match(
    merged: Any, batch: dict[str, Any], model_class: Any, checkpoint: Path, run: Path, inputs: dict
) -> None:
    """`run`'s merged export as voxtune reads it (`merged`, on `batch`) has the logits of the same
    export loaded by `model_class` and of the base `checkpoint` with `run`'s peft adapters
    (1e-4, on the reference's `inputs`), and training changed them (> 1e-3 from the base)."""
    base = model_class.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        ours = merged(batch).logits
        before = base(**inputs).logits  # before PeftModel wraps `base` in place
        exported = model_class.from_pretrained(run / "model").eval()(**inputs).logits
        adapted = PeftModel.from_pretrained(base, run / "adapter").eval()(**inputs).logits
    assert (ours - before).abs().max() > 1e-3  # training changed the model
    assert (ours - exported).abs().max() <= 1e-4
    assert (ours - adapted).abs().max() <= 1e-4


# ---- serving -------------------------------------------------------------------------------


class Served(NamedTuple):
    """What the openai client got from a server."""

    reply: str  # the chat completion's text
    audio_tokens: int  # the audio tokens its usage counts
    transcript: str | None  # /v1/audio/transcriptions's text (None: not asked)
    expected_transcript: str | None  # what the runtime under the server transcribes from the same clip


@contextmanager
def serving(model: Any, path: Path) -> Iterator[tuple[OpenAI, Runtime]]:
    """A real server on `model` (as `path`, whose name is the model id): yields an openai client
    talking to it and the server's runtime; closes both afterwards."""
    config = ServeConfig(model=str(path))
    runtime = build_runtime(config, model)
    try:
        with running_server(runtime, config) as url:
            yield OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60), runtime
    finally:
        runtime.close()


def ask_server(
    model: Any, path: Path, wav: bytes, *, text: str = "Hi", max_tokens: int = 6, transcribe: bool = False
) -> Served:
    """Serve `model` (see `serving`) and ask it with the openai client: a greedy chat completion of
    `wav` then `text`, and (with `transcribe`) a transcription of `wav`."""
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    transcript = expected = None
    with serving(model, path) as (client, runtime):
        completion = client.chat.completions.create(
            model=path.name,
            max_tokens=max_tokens,
            temperature=0,
            messages=[{"role": "user", "content": [part, {"type": "text", "text": text}]}],
        )
        if transcribe:
            transcript = client.audio.transcriptions.create(model=path.name, file=("clip.wav", wav)).text
            expected = runtime.transcribe(load_audio(wav, 16000)).text
    return Served(
        completion.choices[0].message.content, completion.usage.prompt_tokens_details.audio_tokens, transcript, expected
    )


def assert_served(model: Any, path: Path, *, transcribe: bool = True) -> None:
    """The openai client, through a real server on `model`, gets the model's own greedy reply to
    a 1.2 s clip, its audio-token count, and (with `transcribe`) the runtime's transcript."""
    from voxtune.audio import encode

    audio = clip(1.2)
    served = ask_server(model, path, encode(audio, "wav"), transcribe=transcribe)
    assert served.reply == model.generate(messages(audio, "Hi"), max_new_tokens=6)
    assert served.audio_tokens == model.audio_tokens(len(audio))
    assert served.transcript == served.expected_transcript


# ---- files ---------------------------------------------------------------------------------


def copy_files(source: Path, target: Path, names: tuple[str, ...] | None = None) -> Path:
    """Copy `names` (default: every file) of the folder `source` into `target` (made here)."""
    target.mkdir(parents=True)
    for name in names if names is not None else [p.name for p in source.iterdir()]:
        (target / name).write_bytes((source / name).read_bytes())
    return target
