"""Speed of the speech LM on this machine: encoder real-time factor and generation tokens/s.

    .venv/bin/python benchmarks/model_speed.py [--sizes tiny,100m] [--device cpu]

For each size it prints:
- the streaming encoder on 30 s of audio, fed in 160 ms pieces (as a live microphone would)
  against one pass over the whole clip: real-time factor of each and their ratio;
- greedy generation of 64 tokens after an audio prompt, batch 1 and batch 8: voxtune's
  KV-cached loop against transformers' `generate` on the same embeddings (same tokens,
  checked), tokens/s and the ratio. voxtune's time includes preparing the prompt (tokens,
  log-mel, encoder), which the baseline is handed ready-made.

The tiny model's times are a few milliseconds: its ratios are noise; read the 100M ones.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from voxtune.audio import Audio
from voxtune.audio.features import log_mel
from voxtune.model import SpeechLM, build_speech_lm, tiny
from voxtune.model.builder import prepare_tokenizer
from voxtune.model.tiny import tiny_lm_config, train_tokenizer

NEW_TOKENS = 64


def model_of_size(size: str) -> SpeechLM:
    if size == "tiny":
        return tiny("llama", "streaming")
    # About 100M parameters: a 12-layer 768-wide Llama-style LM and an 8-layer 512-wide encoder.
    tokenizer = prepare_tokenizer(train_tokenizer("llama", vocab_size=4000), "llama")
    config = tiny_lm_config("llama", tokenizer, hidden=768, layers=12)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 12, 4, 64
    config.intermediate_size = 2048
    lm = AutoModelForCausalLM.from_config(config)
    encoder = {"n_mels": 80, "dim": 512, "layers": 8, "heads": 8, "chunk_frames": 4, "left_chunks": 8}
    return build_speech_lm(lm, tokenizer, encoder_kind="streaming", encoder_config=encoder).eval()


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Shortest wall time of `repeats` calls (GPU work included: synchronised)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def encoder_rtf(model: SpeechLM, device: str) -> None:
    rng = np.random.default_rng(0)
    audio = Audio((0.1 * rng.standard_normal(30 * 16000)).astype(np.float32), 16000)
    features = log_mel(audio)[None].to(device)  # [1, M, 3000]
    encoder = model.encoder

    def whole():
        encoder(features)

    def streamed():
        state = encoder.init_state(1)
        for start in range(0, features.shape[-1], 16):  # 16 mel frames = 160 ms
            encoder.stream(features[..., start : start + 16], state)
        encoder.flush(state)

    whole()
    streamed()
    t_whole, t_stream = best_of(3, whole), best_of(3, streamed)
    print(
        f"  encoder, 30 s of audio: one pass {t_whole:.3f} s (RTF {t_whole / 30:.4f}), "
        f"160 ms pieces {t_stream:.3f} s (RTF {t_stream / 30:.4f}); streaming/one-pass time {t_stream / t_whole:.2f}x"
    )


@torch.no_grad()
def generation(model: SpeechLM, batch_size: int) -> None:
    rng = np.random.default_rng(1)
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "audio", "audio": Audio((0.1 * rng.standard_normal(3 * 16000)).astype(np.float32), 16000)},
                    {"type": "text", "text": f"Question {i}?"},
                ],
            }
        ]
        for i in range(batch_size)
    ]
    examples = [model.processor.encode_messages(c, add_generation_prompt=True) for c in conversations]
    batch = model.processor.collate(examples, pad_left=True)
    embeds, mask = model.embed(batch), batch["attention_mask"].to(model.device)
    results = {}

    def ours():  # ignore_eos: both sides produce exactly NEW_TOKENS tokens
        results["ours"] = model.generate(conversations, max_new_tokens=NEW_TOKENS, ignore_eos=True)

    def baseline():
        ids = model.lm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
        results["baseline"] = model.tokenizer.batch_decode(ids, skip_special_tokens=True)

    ours(), baseline()
    same = results["ours"] == results["baseline"]
    t_ours, t_base = best_of(3, ours), best_of(3, baseline)
    tokens = batch_size * NEW_TOKENS
    print(
        f"  generate {NEW_TOKENS} tokens, batch {batch_size}: voxtune {tokens / t_ours:.1f} tok/s, "
        f"transformers.generate {tokens / t_base:.1f} tok/s; ratio {t_base / t_ours:.2f}x; same text: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,100m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for size in args.sizes.split(","):
        model = model_of_size(size).to(args.device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"{size}: {params:.1f}M parameters "
            f"(encoder {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.1f}M)"
        )
        encoder_rtf(model, args.device)
        for batch_size in (1, 8):
            generation(model, batch_size)


if __name__ == "__main__":
    main()
