"""The batching engine: a reply is the same alone or decoded with others, whenever it joins;
cancelled replies stop; bad input fails at submit."""

from __future__ import annotations

import queue
import threading

import pytest

from tests.waiting import wait_until
from voxtune.infer import Engine
from voxtune.model import MessageError, SamplingParams, tiny


@pytest.fixture(scope="module")
def model():
    return tiny("llama", "streaming", seed=0)


@pytest.fixture
def engine(model):
    engine = Engine(model, max_batch=8)
    yield engine
    engine.close()


def conversation(i: int, make_clip) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": make_clip(0.5 + 0.3 * i, seed=i)},
                {"type": "text", "text": f"question {i}" * (i + 1)},
            ],
        }
    ]


def test_replies_match_the_model_alone_whenever_they_join(model, engine, make_clip):
    conversations = [conversation(i, make_clip) for i in range(6)]
    alone = [model.generate(c, max_new_tokens=24) for c in conversations]
    results: list = [None] * 6
    started = threading.Barrier(3)

    def run(i: int) -> None:
        if i < 3:
            started.wait()  # three arrive together...
        results[i] = engine.generate(conversations[i], max_new_tokens=24)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads[:3]:
        thread.start()
    wait_until(lambda: engine.steps >= 3, "three decode steps", every=0.001)  # ...the rest join while those decode
    for thread in threads[3:]:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.text for r in results] == alone
    assert engine.peak_batch >= 2


def test_seeded_sampling_is_the_same_alone_and_batched(model, engine, make_clip):
    params = {"max_new_tokens": 16, "temperature": 0.9, "top_p": 0.95, "seed": 3}
    alone = model.generate(conversation(0, make_clip), **params)
    events: queue.Queue = queue.Queue()
    for i in range(4):
        engine.submit(conversation(i, make_clip), SamplingParams(**params), lambda k, v, i=i: events.put((i, k, v)))
    done = {}
    while len(done) < 4:
        i, kind, value = events.get(timeout=30)
        if kind == "done":
            done[i] = value
    assert done[0].text == alone


def test_pieces_add_up_and_counts_are_reported(engine, make_clip):
    pieces = list(engine.stream(conversation(1, make_clip), max_new_tokens=20))
    completion = engine.generate(conversation(1, make_clip), max_new_tokens=20)
    assert "".join(pieces) == completion.text
    assert completion.finish_reason in ("stop", "length") and completion.completion_tokens <= 20
    assert 0 < completion.prompt_audio_tokens < completion.prompt_tokens


def test_a_cancelled_generation_stops(engine):
    events: queue.Queue = queue.Queue()
    generation = engine.submit(
        [{"role": "user", "content": "hi"}],
        SamplingParams(max_new_tokens=1500, ignore_eos=True),
        lambda kind, value: events.put((kind, value)),
    )
    while events.get(timeout=30)[0] != "piece":
        pass
    generation.cancel()
    while (event := events.get(timeout=30))[0] != "done":
        pass
    assert event[1].finish_reason == "cancelled" and event[1].completion_tokens < 1500
    assert engine.active == 0


def test_bad_input_fails_at_submit_and_the_engine_goes_on(engine):
    with pytest.raises(MessageError):
        engine.submit([{"role": "user"}], SamplingParams(), lambda *_: None)
    with pytest.raises(MessageError, match="reads at most"):
        engine.submit([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=10**6), lambda *_: None)
    assert engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=3).completion_tokens <= 3


def test_a_failing_callback_cancels_only_its_own_generation(engine):
    def broken(kind, value):
        raise RuntimeError("the caller's bug")

    engine.submit([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=200, ignore_eos=True), broken)
    completion = engine.generate([{"role": "user", "content": "hello"}], max_new_tokens=20, ignore_eos=True)
    assert completion.completion_tokens == 20
    assert engine.generate([{"role": "user", "content": "again"}], max_new_tokens=3).completion_tokens <= 3


def test_closing_cancels_what_is_running_and_refuses_more(model):
    engine = Engine(model)
    events: queue.Queue = queue.Queue()
    engine.submit(
        [{"role": "user", "content": "hi"}],
        SamplingParams(max_new_tokens=1500, ignore_eos=True),
        lambda kind, value: events.put((kind, value)),
    )
    events.get(timeout=30)
    engine.close()
    while (event := events.get(timeout=30))[0] != "done":
        pass
    assert event[1].finish_reason == "cancelled"
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit([{"role": "user", "content": "hi"}], SamplingParams(), lambda *_: None)


def _while_the_engine_waits(engine, submit_all) -> None:
    """Run `submit_all` while the engine thread is held inside a running generation's
    callback, so that everything it submits is admitted in one prefill together."""
    held, release = threading.Event(), threading.Event()

    def hold(kind, value):
        if not held.is_set():
            held.set()
            release.wait(30)

    engine.submit([{"role": "user", "content": "hold"}], SamplingParams(max_new_tokens=4, ignore_eos=True), hold)
    assert held.wait(30)
    try:
        submit_all()
    finally:
        release.set()


def _answers(engine, requests) -> dict:
    """Submit (messages or Example, params) pairs admitted together: index -> done or error."""
    events: queue.Queue = queue.Queue()

    def submit_all():
        for i, (request, params) in enumerate(requests):
            engine.submit(request, params, lambda kind, value, i=i: events.put((i, kind, value)))

    _while_the_engine_waits(engine, submit_all)
    ended = {}
    while len(ended) < len(requests):
        i, kind, value = events.get(timeout=60)
        if kind in ("done", "error"):
            ended[i] = (kind, value)
    return ended


def test_a_request_whose_sampling_fails_fails_alone(model, engine, make_clip):
    conversations = [conversation(i, make_clip) for i in range(4)]
    alone = [model.generate(c, max_new_tokens=12) for c in conversations]
    poisoned = SamplingParams(max_new_tokens=12, temperature=1.0)
    poisoned.temperature = float("nan")  # past validation: the sampler itself raises on it
    requests = [(c, SamplingParams(max_new_tokens=12)) for c in conversations]
    ended = _answers(engine, requests[:2] + [(conversations[0], poisoned)] + requests[2:])
    assert ended.pop(2)[0] == "error"
    assert [value.text for kind, value in ended.values()] == alone
    assert engine.generate([{"role": "user", "content": "after"}], max_new_tokens=3).completion_tokens <= 3


def test_a_prompt_that_cannot_be_read_fails_alone(model, engine, make_clip):
    conversations = [conversation(i, make_clip) for i in range(3)]
    alone = [model.generate(c, max_new_tokens=12) for c in conversations]
    broken = engine.encode([{"role": "user", "content": "hi"}])
    broken.input_ids[0] = 10**7  # no such token: reading the prompt raises
    requests = [(c, SamplingParams(max_new_tokens=12)) for c in conversations]
    ended = _answers(engine, [requests[0], (broken, SamplingParams(max_new_tokens=12)), *requests[1:]])
    assert ended.pop(1)[0] == "error"
    assert [value.text for kind, value in ended.values()] == alone


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token(model, make_clip):
    chat = conversation(1, make_clip)
    greedy = model.generate(chat, max_new_tokens=10)
    assert model.generate(chat, max_new_tokens=10, temperature=1.0, top_p=1e-300, seed=1) == greedy
    assert model.generate(chat, max_new_tokens=10, temperature=1.0, top_p=0.0, seed=2) == greedy
