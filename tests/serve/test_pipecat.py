"""A voice-agent framework on `/v1/realtime`: pipecat's own OpenAI Realtime services, pointed at
a real `voxtune serve` on 127.0.0.1, with microphone audio streamed at real-time pace (24 kHz,
the API's rate: pipecat's own 16 -> 24 kHz stream resampler garbles speech enough that the
built-in model misreads it).

`OpenAIRealtimeLLMService` (speech to speech): the server finds the turn, the agent gets the
user's words and a spoken reply, and a barge-in stops the reply and truncates what was heard.
`OpenAIRealtimeSTTService` (a transcription session): the agent gets the words of each turn.
Pipecat treats any `error` event as fatal to its connection, so none may come."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tests.serve.conftest import serving
from voxtune.audio import Audio, encode, voices
from voxtune.model import tiny

pytest.importorskip("pipecat", reason="pipecat-ai is a test dependency (pip install -e '.[test]')")

from pipecat.adapters.schemas.function_schema import FunctionSchema  # noqa: E402
from pipecat.adapters.schemas.tools_schema import ToolsSchema  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    ProposedUserStartedSpeakingFrame,
    ProposedUserStoppedSpeakingFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.services.llm_service import FunctionCallParams  # noqa: E402
from pipecat.services.openai.realtime import events  # noqa: E402
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService  # noqa: E402
from pipecat.services.openai.stt import OpenAIRealtimeSTTService  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

RATE = 24000  # the pipeline's microphone rate, the API's own
FRAME = 480  # 20 ms, as a transport delivers it


class Recorder(FrameProcessor):
    """Keeps every frame that passes, in order, with the time it passed."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        self.frames.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)

    def of(self, kind: type) -> list[Frame]:
        return [frame for _, frame in self.frames if isinstance(frame, kind)]


def turn(text: str, after: float = 1.0) -> Audio:
    """`text` spoken by an eSpeak NG voice (the same samples every time), 0.5 s of silence before."""
    speech = voices.synthesize(text, "en", "m3").resample(RATE).samples
    return Audio(
        np.concatenate([np.zeros(RATE // 2, np.float32), speech, np.zeros(int(after * RATE), np.float32)]), RATE
    )


async def run_agent(
    service, audio: list[Audio], until, context: LLMContextAggregatorPair | None = None, timeout: float = 20.0
) -> tuple[Recorder, Recorder]:
    """Run [recorder, service, recorder] (with `context`'s aggregators around them), stream
    `audio` in 20 ms frames at real-time pace, then wait until `until(upstream, downstream)`
    holds; the two recorders (frames going up, which is where pipecat sends user transcripts,
    and frames coming down)."""
    upstream, downstream = Recorder(), Recorder()
    params = PipelineParams(audio_in_sample_rate=RATE)
    processors = [upstream, service, downstream]
    if context is not None:
        processors = [context.user(), *processors, context.assistant()]
    worker = PipelineWorker(Pipeline(processors), params=params)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    try:
        # The service connects and configures its session (tools included) before the user
        # speaks; a busy machine can take seconds. (Each service keeps that state privately.)
        deadline = time.monotonic() + timeout
        while not (getattr(service, "_api_session_ready", False) or getattr(service, "_session_ready", False)):
            assert time.monotonic() < deadline, "the service never configured its session"
            await asyncio.sleep(0.02)
        start = time.monotonic()
        sent = 0
        for clip in audio:
            data = encode(clip, "pcm16")
            for offset in range(0, len(data), 2 * FRAME):
                await worker.queue_frame(
                    InputAudioRawFrame(audio=data[offset : offset + 2 * FRAME], sample_rate=RATE, num_channels=1)
                )
                sent += 1
                await asyncio.sleep(max(0.0, start + sent * FRAME / RATE - time.monotonic()))
        deadline = time.monotonic() + timeout
        while not until(upstream, downstream):
            assert time.monotonic() < deadline, [
                type(f).__name__ for _, f in downstream.frames if not isinstance(f, InputAudioRawFrame)
            ][-40:]
            await asyncio.sleep(0.05)
    finally:
        await worker.cancel()
        await asyncio.wait_for(running, 30)
    return upstream, downstream


def realtime_service(url: str, **session) -> OpenAIRealtimeLLMService:
    return OpenAIRealtimeLLMService(
        api_key="unused",
        base_url=url.replace("http://", "ws://") + "/v1/realtime",
        settings=OpenAIRealtimeLLMService.Settings(
            model="voxtune-tiny", session_properties=events.SessionProperties(**session)
        ),
    )


def test_a_pipecat_agent_hears_each_turn_and_speaks_the_reply(builtin_model):
    """Two turns. The second starts while the first reply would still be playing, so pipecat
    truncates that reply's item to the audio heard so far: the server accepts it."""
    transcription = events.AudioConfiguration(
        input=events.AudioInput(transcription=events.InputAudioTranscription(model="whisper-1"))
    )
    with serving(builtin_model) as (url, _):
        upstream, downstream = asyncio.run(
            run_agent(
                realtime_service(url, audio=transcription),
                [turn("What is seven plus five?", after=0.8), turn("What is three plus four?")],
                lambda up, down: len(down.of(LLMFullResponseEndFrame)) >= 2 and len(up.of(TranscriptionFrame)) >= 2,
            )
        )
    assert not downstream.of(ErrorFrame) and not upstream.of(ErrorFrame)
    assert len(downstream.of(ProposedUserStartedSpeakingFrame)) == 2  # the server's VAD found both turns
    assert len(downstream.of(ProposedUserStoppedSpeakingFrame)) == 2
    for heard in upstream.of(TranscriptionFrame):
        assert "plus" in heard.text.lower()  # the user's words, from the input transcription
    reply = "".join(frame.text for frame in downstream.of(TTSTextFrame))
    assert reply.strip()
    spoken = b"".join(frame.audio for frame in downstream.of(TTSAudioRawFrame))
    assert len(spoken) > 2 * 2 * 24000 * 0.3  # at least 0.3 s of 24 kHz speech per reply
    assert {frame.sample_rate for frame in downstream.of(TTSAudioRawFrame)} == {24000}


def test_a_pipecat_agent_is_interrupted_by_a_new_turn():
    """A random model's reply runs to the token limit (1024 tokens, seconds on 2 cores); a
    second turn, spoken while it runs, ends it and gets a reply of its own."""
    model = tiny("llama", "streaming", seed=0)

    def second_reply_started(up: Recorder, down: Recorder) -> bool:
        return len(down.of(LLMFullResponseStartFrame)) >= 2

    replies: list = []

    with serving(model) as (url, _):
        service = realtime_service(url)

        @service.event_handler("on_conversation_item_updated")
        async def updated(service, item_id, item) -> None:  # each output item of a response.done
            if item is not None and item.role == "assistant":
                replies.append(item)

        upstream, downstream = asyncio.run(
            run_agent(
                service,
                [turn("What is seven plus five?", after=0.6), turn("Stop, please.")],
                second_reply_started,
            )
        )
    assert not downstream.of(ErrorFrame) and not upstream.of(ErrorFrame)
    kinds = [type(frame) for _, frame in downstream.frames]
    second_start = [i for i, kind in enumerate(kinds) if kind is LLMFullResponseStartFrame][1]
    interrupted = [i for i, kind in enumerate(kinds) if kind is ProposedUserStartedSpeakingFrame][1]
    assert kinds.index(LLMFullResponseStartFrame) < interrupted < second_start
    assert replies[0].status == "incomplete"  # the first reply was cut short (cancelled by the turn)


def test_a_pipecat_agent_calls_a_tool_and_answers_after_its_result(tool_model):
    """A model taught to call `add` (see tests/serve/conftest.py): pipecat runs the function the
    server's call names and sends its result back through its context aggregators, and the
    model answers again. (Pipecat also replays its context as a user message at that point, so
    the answer's words are not the taught ones: those are checked with the official client.)"""
    add = FunctionSchema(
        name="add",
        description="Add two numbers",
        properties={"a": {"type": "number"}, "b": {"type": "number"}},
        required=["a", "b"],
    )
    tools = ToolsSchema(standard_tools=[add])
    calls = []

    async def run_add(params: FunctionCallParams) -> None:
        calls.append(dict(params.arguments))
        await params.result_callback(params.arguments["a"] + params.arguments["b"])

    with serving(tool_model) as (url, _):
        service = realtime_service(url, tools=tools)
        service.register_function("add", run_add)
        upstream, downstream = asyncio.run(
            run_agent(
                service,
                [turn("What is seven plus five?")],
                lambda up, down: len(down.of(TTSAudioRawFrame)) > 0,  # the answer after the result
                context=LLMContextAggregatorPair(LLMContext(tools=tools)),
            )
        )
    assert not downstream.of(ErrorFrame) and not upstream.of(ErrorFrame)
    assert calls == [{"a": 7, "b": 5}]  # the server's function call, run by pipecat
    assert len(downstream.of(LLMFullResponseStartFrame)) == 2  # the call, then the answer
    assert "".join(frame.text for frame in downstream.of(TTSTextFrame)).strip()


def test_pipecat_realtime_stt_transcribes_each_turn(builtin_model):
    """A transcription session (`?intent=transcription`), as pipecat's realtime STT opens it."""
    with serving(builtin_model) as (url, _):
        service = OpenAIRealtimeSTTService(
            api_key="unused",
            base_url=url.replace("http://", "ws://") + "/v1/realtime",
            settings=OpenAIRealtimeSTTService.Settings(model="whisper-1"),
            turn_detection={"type": "server_vad"},
        )
        upstream, downstream = asyncio.run(
            run_agent(
                service,
                [turn("What is seven plus five?"), turn("What is three plus four?")],
                lambda up, down: len(down.of(TranscriptionFrame)) >= 2,
            )
        )
    assert not downstream.of(ErrorFrame) and not upstream.of(ErrorFrame)
    first, second = (frame.text.lower() for frame in downstream.of(TranscriptionFrame))
    assert "plus" in first and "plus" in second
