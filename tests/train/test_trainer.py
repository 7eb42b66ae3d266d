"""The training loop: resume gives the same curve, methods train what they say, export works."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import voxtune
from voxtune.audio.file_audio import FileAudio
from voxtune.train.trainer import Trainer, TrainError, autocasts


@pytest.fixture
def _recipe(tiny_recipe):
    """`_recipe(corpus, tmp_path, *overrides)`: the shared tiny recipe writing to tmp_path/run."""
    return lambda corpus, tmp_path, *overrides: tiny_recipe(tmp_path / "run", *overrides)


def _losses(run_dir) -> list[float]:
    return [
        json.loads(line)["loss"]
        for line in (run_dir / "log.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_a_resumed_run_follows_the_uninterrupted_curve(corpus, tmp_path, method, _recipe):
    whole = Trainer(_recipe(corpus, tmp_path / "a", f"train.method={method}"), log=lambda _: None)
    whole.fit()
    interrupted = Trainer(_recipe(corpus, tmp_path / "b", f"train.method={method}"), log=lambda _: None)
    interrupted.fit(stop_after=3)
    assert interrupted.state.step == 3
    resumed = Trainer(_recipe(corpus, tmp_path / "b", f"train.method={method}"), log=lambda _: None)
    resumed.fit(resume=True)
    expected, got = _losses(tmp_path / "a" / "run"), _losses(tmp_path / "b" / "run")
    assert len(expected) == len(got) == 6
    assert got == pytest.approx(expected, rel=1e-5)


def test_lora_trains_adapters_and_projector_only_and_exports_merged(corpus, tmp_path, _recipe):
    trainer = Trainer(_recipe(corpus, tmp_path, "train.max_steps=3"), log=lambda _: None)
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n.startswith("projector.") for n in names)
    encoder_before = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    trainer.fit()
    assert all(torch.equal(v, trainer.model.encoder.state_dict()[k]) for k, v in encoder_before.items())
    exported = trainer.export()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    loaded = voxtune.load(exported)
    assert not hasattr(loaded.lm, "peft_config")  # merged: a plain causal LM
    assert isinstance(loaded.generate([{"role": "user", "content": "hi"}], max_new_tokens=3), str)


def test_projector_only_leaves_the_lm_alone(corpus, tmp_path, _recipe):
    trainer = Trainer(_recipe(corpus, tmp_path, "train.method=projector", "train.max_steps=2"), log=lambda _: None)
    lm_before = {k: v.clone() for k, v in trainer.model.lm.state_dict().items()}
    projector_before = trainer.model.projector.down.weight.clone()
    trainer.fit()
    assert all(torch.equal(v, trainer.model.lm.state_dict()[k]) for k, v in lm_before.items())
    assert not torch.equal(projector_before, trainer.model.projector.down.weight)


def test_loss_falls_and_evaluation_reports_wer(corpus, tmp_path, _recipe):
    trainer = Trainer(
        _recipe(corpus, tmp_path, "train.max_steps=30", "train.method=full", "eval.every=30", "eval.at_start=true"),
        log=lambda _: None,
    )
    trainer.fit()
    losses = _losses(tmp_path / "run")
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evaluation = [r for r in records if "wer" in r]
    assert [r["step"] for r in evaluation] == [0, 30]  # before training, and at the end
    assert evaluation[1]["eval_loss"] < evaluation[0]["eval_loss"]
    assert evaluation[0]["wer"] >= 0 and "eval_loss" in evaluation[0]
    # Every task of the mixture is asked and scored: transcribe and describe here.
    assert evaluation[0]["n_transcribe"] == evaluation[0]["n_describe"] == 2
    assert 0 <= evaluation[0]["acc_describe"] <= 1 and 0 <= evaluation[0]["acc_transcribe"] <= 1
    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    scalars = _tensorboard_scalars(events)
    assert [step for step, _ in scalars["loss"]] == list(range(1, 31))
    assert scalars["loss"][-1][1] == pytest.approx(losses[-1], rel=1e-6)
    assert "eval_loss" in scalars and "wer" in scalars, sorted(scalars)


def test_bad_recipes_and_resume_without_checkpoints(corpus, tmp_path, _recipe):
    with pytest.raises(TrainError, match="no modules named"):
        Trainer(_recipe(corpus, tmp_path, "train.lora.targets=[nope]"), log=lambda _: None)
    with pytest.raises(TrainError, match="nothing to resume"):
        Trainer(_recipe(corpus, tmp_path), log=lambda _: None).fit(resume=True)


def test_the_encoder_cache_changes_nothing_but_skips_the_encoder(corpus, tmp_path, _recipe):
    plain = Trainer(_recipe(corpus, tmp_path / "plain", "train.cache_encoder=false"), log=lambda _: None)
    plain.fit()
    cached = Trainer(_recipe(corpus, tmp_path / "cached"), log=lambda _: None)
    assert cached.cache is not None
    calls = []
    cached.model.encoder.register_forward_hook(lambda *args: calls.append(1))
    on_file: dict[int, set[bool]] = {}  # epoch -> whether its clips were left undecoded
    cached.on_batch = lambda batch, examples, epoch: on_file.setdefault(epoch, set()).update(
        isinstance(clip, FileAudio) and not clip.holds_samples for clip in batch["clips"]
    )
    cached.fit()
    assert _losses(tmp_path / "cached" / "run") == pytest.approx(_losses(tmp_path / "plain" / "run"), rel=1e-5)
    assert cached.cache.hits > 0  # later epochs read what the first one wrote
    # Later epochs know each file's clip by its length and digest, without decoding it.
    assert on_file[0] == {False} and on_file[max(on_file)] == {True}
    # The encoder ran once per distinct clip (clip by clip on the CPU), never for a hit.
    assert len(calls) == cached.cache.misses <= len(cached.train_data)


def test_cache_is_off_when_the_encoder_trains_or_audio_changes(corpus, tmp_path, _recipe):
    assert (
        Trainer(_recipe(corpus, tmp_path, "train.method=full", "train.train_encoder=true"), log=lambda _: None).cache
        is None
    )
    assert Trainer(_recipe(corpus, tmp_path, "data.augment={noise_prob: 0.5}"), log=lambda _: None).cache is None


def test_checkpointing_and_bf16_autocast_train_as_well(corpus, tmp_path, _recipe):
    reference = Trainer(_recipe(corpus, tmp_path / "ref", "train.max_steps=3"), log=lambda _: None)
    reference.fit()
    recomputed = Trainer(
        _recipe(corpus, tmp_path / "ckpt", "train.max_steps=3", "train.grad_checkpointing=true"), log=lambda _: None
    )
    recomputed.fit()
    assert _losses(tmp_path / "ckpt" / "run") == pytest.approx(_losses(tmp_path / "ref" / "run"), rel=1e-4)
    half = Trainer(
        _recipe(corpus, tmp_path / "bf16", "train.max_steps=3", "train.precision=bf16-autocast"), log=lambda _: None
    )
    half.fit()
    assert _losses(tmp_path / "bf16" / "run") == pytest.approx(_losses(tmp_path / "ref" / "run"), rel=0.05)


def test_bf16_weights_train_close_to_float32_and_export_in_full_precision(corpus, tmp_path, _recipe):
    steps = ["train.max_steps=3", "eval.limit=1", "eval.max_new_tokens=2"]
    reference = Trainer(_recipe(corpus, tmp_path / "ref", *steps), log=lambda _: None)
    reference.fit()
    lines: list[str] = []
    trainer = Trainer(_recipe(corpus, tmp_path / "bf16", *steps, "train.precision=bf16"), log=lines.append)
    lm = trainer.model.base_lm()
    frozen = [p for p in lm.parameters() if not p.requires_grad]
    computes = "the LM computes in bf16, its adapters in float32"
    assert f"precision: bf16 ({len(frozen)} frozen LM weights held in bf16; {computes})" in lines
    assert "packed rows: made up to a multiple of 64 positions (bf16 on the CPU)" in lines
    assert trainer.batch_loss.head_rows == 16  # the loss head's rows too
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in trainer.params} == {torch.float32}  # adapters and projector: master weights
    assert all(p.dtype == torch.float32 for p in trainer.model.encoder.parameters())
    rows: list[int] = []
    trainer.on_batch = lambda batch, examples, epoch: rows.append(batch["input_ids"].shape[1])
    # No autocast: the frozen layers take and give bf16, the adapters compute in float32.
    seen: list[tuple[str, torch.dtype, bool]] = []
    q_proj = trainer.model.lm.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    for name, module in (("base", q_proj.base_layer), ("lora_B", q_proj.lora_B["default"])):
        module.register_forward_hook(
            lambda module, args, out, name=name: seen.append((name, args[0].dtype, torch.is_autocast_enabled("cpu")))
        )
    trainer.fit()
    assert rows and all(length % 64 == 0 for length in rows)  # made up to a multiple on the CPU
    assert set(seen) == {("base", torch.bfloat16, False), ("lora_B", torch.float32, False)}
    # On a GPU, which builds no kernel per shape, the same LM would train under autocast.
    assert autocasts(SimpleNamespace(lm=trainer.model.lm, device=torch.device("cuda")), "bf16")
    assert _losses(tmp_path / "bf16" / "run") == pytest.approx(_losses(tmp_path / "ref" / "run"), rel=0.05)
    # Evaluation runs under the same autocast as training.
    assert trainer.evaluate()["eval_loss"] == pytest.approx(reference.evaluate()["eval_loss"], rel=0.05)
    exported = voxtune.load(trainer.export())
    embeddings = exported.lm.get_input_embeddings().weight
    assert embeddings.dtype == torch.float32
    # Built again in full precision: the merged weights were never rounded to bf16.
    assert not torch.equal(embeddings.to(torch.bfloat16).float(), embeddings)
    torch.testing.assert_close(embeddings, reference.model.base_lm().get_input_embeddings().weight)


def test_bf16_weights_with_ctc_export_without_its_head(corpus, tmp_path, _recipe):
    overrides = ("train.max_steps=2", "train.lora.encoder=true", "train.ctc={weight: 0.5}", "train.precision=bf16")
    trainer = Trainer(_recipe(corpus, tmp_path, *overrides), log=lambda _: None)
    trainer.fit()
    exported = voxtune.load(trainer.export())  # rebuilt in float32, the head's trained weights loaded
    assert not any(name.startswith("ctc_head") for name in exported.state_dict())
    assert {p.dtype for p in exported.parameters()} == {torch.float32}


def test_bf16_weights_hold_a_full_fine_tunes_teacher_in_bf16(corpus, tmp_path, _recipe):
    overrides = ("train.method=full", "train.distill={weight: 0.5}", "train.precision=bf16")
    trainer = Trainer(_recipe(corpus, tmp_path, *overrides), log=lambda _: None)
    teacher = trainer.distiller.frozen_copy
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.lm.parameters()} == {torch.float32}  # it all trains
    assert autocasts(trainer.model, "bf16")  # so its products run under autocast


def test_bf16_weights_with_adapters_on_the_output_head_run_under_autocast(corpus, tmp_path, _recipe):
    # Natively the head's merged weight would come out float32, at the vocabulary's size.
    overrides = ("train.lora.targets=[q_proj, v_proj, lm_head]", "train.precision=bf16")
    trainer = Trainer(_recipe(corpus, tmp_path, *overrides), log=lambda _: None)
    assert any("lm_head" in name and p.requires_grad for name, p in trainer.model.lm.named_parameters())
    assert autocasts(trainer.model, "bf16")


def test_bf16_weights_under_qlora_compute_in_bf16(corpus, tmp_path, _recipe):
    pytest.importorskip("bitsandbytes", reason="QLoRA's 4-bit layers need bitsandbytes")
    steps = ["train.max_steps=3", "train.method=qlora"]
    Trainer(_recipe(corpus, tmp_path / "fp32", *steps), log=lambda _: None).fit()
    trainer = Trainer(_recipe(corpus, tmp_path / "bf16", *steps, "train.precision=bf16"), log=lambda _: None)
    quantized = [m for m in trainer.model.base_lm().modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and {m.compute_dtype for m in quantized} == {torch.bfloat16}
    trainer.fit()
    assert _losses(tmp_path / "bf16" / "run") == pytest.approx(_losses(tmp_path / "fp32" / "run"), rel=0.05)


def test_bf16_weights_in_several_processes_are_refused(corpus, tmp_path, _recipe, monkeypatch):
    from voxtune.train import distributed

    monkeypatch.setattr(distributed, "choose_strategy", lambda strategy, procs: "ddp")
    with pytest.raises(TrainError, match="train.precision=bf16 runs in one process for now, not with ddp"):
        Trainer(_recipe(corpus, tmp_path, "train.precision=bf16"), log=lambda _: None)


def test_lora_on_the_encoder_trains_it_and_exports_both_adapters(corpus, tmp_path, _recipe):
    trainer = Trainer(
        _recipe(corpus, tmp_path, "train.max_steps=3", "train.lora.encoder=true", "train.lora.lm=false"),
        log=lambda _: None,
    )
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.") and "lora_" in n for n in names)
    assert not any(n.startswith("lm.") for n in names)  # the LM stays frozen
    assert trainer.cache is None  # the encoder's outputs change as it trains
    trainer.fit()
    trainer.model.eval()
    clip = trainer.valid_data[0].clips[0]
    expected = trainer.model.transcribe(clip, max_new_tokens=6)
    with torch.no_grad():
        features = trainer.model.embed(trainer.model.processor.collate([trainer.valid_data[0]]))
    exported = trainer.export()
    assert (tmp_path / "run" / "adapter" / "encoder" / "adapter_config.json").is_file()
    loaded = voxtune.load(exported)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.embed(loaded.processor.collate([trainer.valid_data[0]])), features, rtol=1e-4, atol=1e-5
        )
    assert loaded.transcribe(clip, max_new_tokens=6) == expected


def test_lora_on_the_output_head_gets_gradients(corpus, tmp_path, _recipe):
    """The chunked loss projects with the head's weight itself: adapters on the head must be in it."""
    trainer = Trainer(
        _recipe(corpus, tmp_path, "train.max_steps=2", "train.lora.targets=[q_proj,v_proj,lm_head]"), log=lambda _: None
    )
    head = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lm_head.lora_B" in n}
    assert head and all(not p.any() for p in head.values())  # LoRA's B starts at zero
    trainer.fit()
    now = dict(trainer.model.named_parameters())
    assert all(now[n].detach().abs().sum() > 0 for n in head)


def test_qlora_trains_lora_on_a_4_bit_lm_and_exports_what_it_computes(corpus, tmp_path, _recipe):
    pytest.importorskip("bitsandbytes", reason="QLoRA's 4-bit layers need bitsandbytes")
    trainer = Trainer(_recipe(corpus, tmp_path, "train.method=qlora", "train.max_steps=8"), log=lambda _: None)
    lm = trainer.model.base_lm()
    kinds = {
        name: type(getattr(module, "base_layer", module)).__name__  # under a LoRA layer
        for name, module in lm.named_modules()
        if name.endswith(("_proj", "lm_head"))
    }
    assert kinds["lm_head"] == "Linear"  # the head keeps its weights
    assert {kind for name, kind in kinds.items() if name != "lm_head"} == {"Linear4bit"}
    trainer.fit()
    assert _losses(tmp_path / "run")[-1] < _losses(tmp_path / "run")[0]
    processor = trainer.model.processor
    batch = processor.collate(
        [processor.encode_messages([{"role": "user", "content": "hi"}], add_generation_prompt=True)]
    )
    with torch.no_grad():
        trained = trainer.model.eval()(batch).logits
        exported = voxtune.load(trainer.export())
        assert not any(type(m).__name__ == "Linear4bit" for m in exported.modules())  # full precision again
        assert (exported(batch).logits - trained).abs().max() <= 1e-4
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_fused_kernels_and_packed_attention_are_reported(corpus, tmp_path, _recipe):
    lines = []
    Trainer(_recipe(corpus, tmp_path), log=lines.append)
    assert "fused kernels: none on cpu (the PyTorch reference path)" in lines
    assert any(line.startswith("attention: per example in packed rows") for line in lines)
    lines.clear()
    Trainer(_recipe(corpus, tmp_path, "train.fused_kernels=false", "train.pack=false"), log=lines.append)
    assert "fused kernels: off (train.fused_kernels=false)" in lines
    assert not any(line.startswith("attention:") for line in lines)


def test_the_loss_switches_change_speed_not_results(corpus, tmp_path, _recipe):
    import threading

    def run(name, *overrides):
        """Train 3 steps; returns (calls of the output head module, whether a prefetch thread ran)."""
        trainer = Trainer(_recipe(corpus, tmp_path / name, "train.max_steps=3", *overrides), log=lambda _: None)
        head_calls, threads = [], []
        trainer.model.base_lm().get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
        trainer.on_batch = lambda *a: threads.append(any(t.name == "voxtune-prefetch" for t in threading.enumerate()))
        trainer.fit()
        return len(head_calls), any(threads)

    # The chunked loss projects with the head's weight and never calls the head; no thread on the CPU.
    assert run("ref") == (0, False)
    assert run("full_logits", "train.chunked_loss=false") == (3, False)  # the LM's own loss: full logits
    assert run("prefetch", "train.prefetch=2") == (0, True)
    run("small_chunks", "train.chunk_tokens=7")
    for name in ("full_logits", "prefetch", "small_chunks"):
        assert _losses(tmp_path / name / "run") == pytest.approx(_losses(tmp_path / "ref" / "run"), rel=1e-4), name


def test_batches_are_seen_through_the_hook_and_bucketing_switches_off(corpus, tmp_path, _recipe):
    seen = []
    trainer = Trainer(_recipe(corpus, tmp_path, "train.max_steps=4", "train.max_batch=3"), log=lambda _: None)
    trainer.on_batch = lambda batch, examples, epoch: seen.append((len(examples), epoch))
    trainer.fit()
    assert len(seen) == 4 and all(n <= 3 for n, _ in seen)
    lengths = trainer.train_data.token_lengths()
    spread = lambda sampler: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in sampler.batches())  # noqa: E731
    unbucketed = Trainer(_recipe(corpus, tmp_path, "train.max_batch=3", "train.bucket=false"), log=lambda _: None)
    assert spread(unbucketed.sampler) > spread(trainer.sampler)  # random batches mix lengths more


def test_a_run_killed_at_any_moment_resumes_to_the_same_curve(corpus, tmp_path, _recipe):
    """kill -9 during training (checkpoints every step, so mid-write often): the last good
    checkpoint survives and `--resume` ends where the uninterrupted run does."""
    import time

    from voxtune.config import dump_config

    steps = ["train.max_steps=10", "output.save_every=1", "output.keep=2"]
    Trainer(_recipe(corpus, tmp_path / "whole", *steps), log=lambda _: None).fit()
    recipe = _recipe(corpus, tmp_path / "killed", *steps)
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_config(recipe))
    checkpoints = tmp_path / "killed" / "run" / "checkpoints"
    for wait_for in (2, 5):  # killed twice, the second time after a resume
        command = [sys.executable, "-m", "voxtune.cli", "train", str(path)] + (["--resume"] if wait_for > 2 else [])
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (checkpoints / f"step-{wait_for:07d}").exists() and time.monotonic() < deadline:
            assert process.poll() is None, "training ended before it could be killed"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    Trainer(recipe, log=lambda _: None).fit(resume=True)
    assert _losses(tmp_path / "killed" / "run") == pytest.approx(_losses(tmp_path / "whole" / "run"), rel=1e-5)
    assert not list(checkpoints.glob(".step-*"))  # no half-written folders left behind
    # One event file per run: a resumed run's purges what came before and writes the kept
    # log records again, so the newest file alone holds every step once.
    newest = max(
        (tmp_path / "killed" / "run" / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime
    )
    scalars = _tensorboard_scalars(newest)
    assert scalars["purge"] == [(0, 0.0)]
    assert [step for step, _ in scalars["loss"]] == list(range(1, 11))
    assert [loss for _, loss in scalars["loss"]] == pytest.approx(_losses(tmp_path / "whole" / "run"), rel=1e-5)


def _tensorboard_scalars(path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of a TensorBoard event file (TFRecord: length, crc, Event proto, crc); a
    session start that purges later steps is listed under "purge"."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, offset, scalars = path.read_bytes(), 0, {}
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
        if event.HasField("session_log") and event.session_log.status == event.session_log.START:
            scalars.setdefault("purge", []).append((event.step, 0.0))
    return scalars


def test_ctc_on_the_encoder_trains_it_resumes_and_stays_out_of_the_export(corpus, tmp_path, _recipe):
    overrides = ("train.method=full", "train.train_encoder=true", "train.ctc={weight: 0.5}")
    trainer = Trainer(_recipe(corpus, tmp_path / "a", *overrides), log=lambda _: None)
    head = trainer.model.ctc_head
    assert any(p is head.proj.weight for p in trainer.params)
    before = head.proj.weight.clone()
    trainer.fit()
    assert not torch.equal(before, head.proj.weight)
    # The same first step without CTC: a smaller logged loss, and another encoder (CTC's
    # gradient reached it).
    plain = Trainer(
        _recipe(corpus, tmp_path / "b", "train.method=full", "train.train_encoder=true"), log=lambda _: None
    )
    plain.fit(stop_after=1)
    first = Trainer(_recipe(corpus, tmp_path / "c", *overrides), log=lambda _: None)
    first.fit(stop_after=1)
    assert _losses(tmp_path / "c" / "run")[0] > _losses(tmp_path / "b" / "run")[0]
    encoder, plain_encoder = first.model.encoder.state_dict(), plain.model.encoder.state_dict()
    assert any(not torch.allclose(v, plain_encoder[k]) for k, v in encoder.items())
    # Resumed from a checkpoint (the head's weights and moments in it), the curve goes on alike.
    resumed = Trainer(_recipe(corpus, tmp_path / "c", *overrides), log=lambda _: None)
    resumed.fit(resume=True)
    assert _losses(tmp_path / "c" / "run") == pytest.approx(_losses(tmp_path / "a" / "run"), rel=1e-5)
    exported = voxtune.load(trainer.export())
    assert not any(name.startswith("ctc_head") for name in exported.state_dict())
    record = json.loads((tmp_path / "a" / "run" / "model" / "training.json").read_text())
    assert (
        record["recipe"]["train"]["ctc"] == {"weight": 0.5} and record["steps"] == 6 and record["training_seconds"] > 0
    )


def test_ctc_needs_a_training_encoder(corpus, tmp_path, _recipe):
    with pytest.raises(TrainError, match="train.ctc trains the encoder"):
        Trainer(_recipe(corpus, tmp_path, "train.method=full", "train.ctc={weight: 0.3}"), log=lambda _: None)


def test_a_tiny_model_can_learn_its_tokenizer_from_the_training_text(corpus, tmp_path, _recipe):
    from voxtune.data.manifest import read_manifest
    from voxtune.train.trainer import training_text

    built_in = Trainer(_recipe(corpus, tmp_path / "a"), log=lambda _: None).model.tokenizer
    learned = Trainer(
        _recipe(corpus, tmp_path / "b", "model.tiny.tokenizer_corpus=data"), log=lambda _: None
    ).model.tokenizer
    text = training_text(read_manifest(corpus / "train.jsonl"))
    assert text.count("\n") >= 10
    count = lambda tokenizer: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert count(learned) < 0.8 * count(built_in)  # its merges are the corpus's words


def test_a_second_stage_reads_the_first_stages_encoder_frozen_and_records_it(corpus, tmp_path, _recipe):
    from voxtune.model.checkpoint import ModelLoadError

    first = Trainer(
        _recipe(corpus, tmp_path / "a", "train.method=full", "train.train_encoder=true"), log=lambda _: None
    )
    first.fit()
    stage1 = first.export()
    trained = voxtune.load(stage1)
    second = Trainer(
        _recipe(corpus, tmp_path / "b", "train.method=full", f"model.init_encoder={stage1}"), log=lambda _: None
    )
    fresh = Trainer(_recipe(corpus, tmp_path / "c", "train.method=full"), log=lambda _: None).model
    # The encoder is stage 1's; the LM starts again (as a recipe without init_encoder would).
    for key, value in trained.encoder.state_dict().items():
        assert torch.equal(second.model.encoder.state_dict()[key], value)
    for key, value in fresh.lm.state_dict().items():
        assert torch.equal(second.model.lm.state_dict()[key], value)
    second.fit()
    for key, value in trained.encoder.state_dict().items():
        assert torch.equal(second.model.encoder.state_dict()[key], value)  # frozen in stage 2
    record = json.loads((second.export() / "training.json").read_text())
    assert record["base"]["model"] == str(stage1)
    assert record["base"]["training"]["steps"] == 6 and record["base"]["training"]["recipe"]["train"]["train_encoder"]
    # An encoder of another shape is refused, naming the weights that differ.
    with pytest.raises(ModelLoadError, match="encoder weights do not match.*wrong shape"):
        Trainer(
            _recipe(corpus, tmp_path / "d", f"model.init_encoder={stage1}", "model.tiny.encoder_dim=48"),
            log=lambda _: None,
        )


def test_init_encoder_is_refused_beside_a_loaded_model(tiny_recipe, tmp_path):
    from voxtune.config import ConfigError

    with pytest.raises(ConfigError, match="model.init_encoder goes with model.tiny or model.lm"):
        tiny_recipe(tmp_path, "model.tiny=null", "model.load=somewhere", "model.init_encoder=elsewhere")


def test_a_full_disk_ends_training_in_one_line_and_resume_goes_on(tiny_recipe, tmp_path):
    """A file-size limit makes the checkpoint's write fail as a full disk does (EFBIG, not ENOSPC:
    the same path through safetensors and torch.save)."""
    recipe = tiny_recipe(tmp_path / "run", "train.max_steps=4", "output.save_every=2")
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe.model_dump(mode="json")))

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # the checkpoint is ~140 kB

    Trainer(recipe, log=lambda _: None).fit(stop_after=2)
    # Only the run that meets the full disk needs a process of its own (its file-size limit).
    train = [sys.executable, "-m", "voxtune.cli", "train", str(path)]
    full = subprocess.run([*train, "--resume"], preexec_fn=limited, capture_output=True, text=True, timeout=300)
    assert full.returncode == 1, full.stderr
    assert full.stderr.startswith("voxtune: error: cannot write the checkpoint")  # the whole of stderr: one line
    assert full.stderr.count("\n") == 1 and "make room, then --resume" in full.stderr
    checkpoints = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert checkpoints == ["step-0000002"]  # the earlier one whole, no staging folder left behind
    said: list[str] = []
    trainer = Trainer(recipe, log=said.append)
    trainer.fit(resume=True)
    assert any(line.startswith("resumed from") for line in said) and trainer.state.step == 4
    assert (trainer.export() / "voxtune.json").is_file()


def test_a_tiny_lm_learns_to_read_a_pretrained_whisper_encoder_frozen(corpus, tmp_path, _recipe, whisper_tiny_en):
    """voxtune-tiny v3's shape: model.tiny with model.encoder, a Whisper checkpoint whose
    encoder (its weights exactly) stays frozen under a new LM and the Ultravox projector."""
    from voxtune.model.whisper_encoder import load_whisper_encoder

    overrides = ("model.tiny.encoder=whisper", f"model.encoder={whisper_tiny_en}", "train.method=full")
    trainer = Trainer(_recipe(corpus, tmp_path, *overrides), log=lambda _: None)
    pretrained = load_whisper_encoder(whisper_tiny_en).state_dict()
    assert trainer.model.config.projector_norm_mid and trainer.model.encoder.dim == 384
    lm_before = {k: v.clone() for k, v in trainer.model.lm.state_dict().items()}
    for key, value in pretrained.items():
        assert torch.equal(trainer.model.encoder.state_dict()[key], value)
    trainer.fit()
    for key, value in pretrained.items():
        assert torch.equal(trainer.model.encoder.state_dict()[key], value)  # frozen
    assert any(not torch.equal(trainer.model.lm.state_dict()[k], v) for k, v in lm_before.items())  # trained
    reloaded = voxtune.load(trainer.export())
    for key, value in pretrained.items():
        assert torch.equal(reloaded.encoder.state_dict()[key], value)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (("model.encoder=somewhere",), "model.tiny.encoder is whisper"),
        (("model.tiny.encoder=whisper", "model.encoder={dim: 8}"), "model.encoder is a Whisper checkpoint"),
        (("model.tiny.encoder=whisper", "model.encoder=a", "model.init_encoder=b"), "set one"),
        (("model.tiny=null", "model.load=x", "model.encoder=y"), "model.load brings its own encoder"),
    ],
)
def test_a_pretrained_encoder_under_a_tiny_lm_is_checked_before_anything_loads(tiny_recipe, tmp_path, overrides, words):
    from voxtune.config import ConfigError

    with pytest.raises(ConfigError, match=words):
        tiny_recipe(tmp_path, *overrides)


def test_compiled_layers_train_on_the_same_curve_and_evaluate_uncompiled(corpus, tmp_path, _recipe):
    steps = ["train.max_steps=2", "train.log_every=1", "eval.every=2", "eval.limit=1", "eval.max_new_tokens=2"]
    Trainer(_recipe(corpus, tmp_path / "eager", *steps), log=lambda _: None).fit()
    lines: list[str] = []
    trainer = Trainer(_recipe(corpus, tmp_path / "compiled", *steps, "train.compile=true"), log=lines.append)
    layers = trainer.model.base_lm().get_decoder().layers
    assert f"compiled: {len(layers)} decoder layers (torch.compile, dynamic shapes)" in lines
    assert all(layer._compiled_call_impl is not None for layer in layers)
    traced: list[bool] = []
    layers[0].mlp.register_forward_pre_hook(lambda module, args: traced.append(torch.compiler.is_compiling()))
    trainer.fit()
    assert True in traced  # the layers ran through torch.compile
    eager, compiled = (
        [json.loads(line) for line in (tmp_path / run / "run" / "log.jsonl").read_text().splitlines()]
        for run in ("eager", "compiled")
    )
    for key in ("loss", "eval_loss", "wer"):
        got, want = [r[key] for r in compiled if key in r], [r[key] for r in eager if key in r]
        assert got and got == pytest.approx(want, rel=1e-4), key


def test_compile_with_recomputed_activations_is_refused(corpus, tmp_path, _recipe):
    with pytest.raises(ValueError, match="compile and grad_checkpointing do not go together yet"):
        _recipe(corpus, tmp_path, "train.compile=true", "train.grad_checkpointing=true")
