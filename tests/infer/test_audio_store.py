"""The audio store: ids per owner, expiry, a memory bound with least-recently-used eviction,
and clips found again by content."""

from __future__ import annotations

import pytest
import torch

from voxtune.infer import AudioNotFoundError, AudioStore
from voxtune.model import AudioEmbedding


def clip(tokens: int = 10) -> AudioEmbedding:
    return AudioEmbedding(torch.zeros(tokens, 64), tokens / 12.5)  # 2,560 bytes per 10 tokens


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_id_belongs_to_its_owner():
    store = AudioStore(max_bytes=1 << 20, ttl_seconds=60)
    entry = store.put_clip("alice", clip())
    assert store.get(entry.id, "alice").embedding is entry.embedding
    with pytest.raises(AudioNotFoundError):
        store.get(entry.id, "bob")
    with pytest.raises(AudioNotFoundError):
        store.get("audio_nothing", "alice")


def test_entries_expire():
    clock = Clock()
    store = AudioStore(max_bytes=1 << 20, ttl_seconds=60, clock=clock)
    entry = store.put_reply("alice", "hello")
    assert entry.expires_at == 1060
    clock.now = 1059
    assert store.get(entry.id, "alice").text == "hello"
    clock.now = 1060
    with pytest.raises(AudioNotFoundError):
        store.get(entry.id, "alice")
    assert store.stats.expired == 1 and store.stats.entries == 0 and store.stats.bytes == 0


def test_the_least_recently_used_go_first_beyond_the_memory_bound():
    store = AudioStore(max_bytes=3 * clip().embeddings.numel() * 4 + 3 * 400, ttl_seconds=60)
    first, second, third = (store.put_clip("alice", clip()) for _ in range(3))
    store.get(first.id, "alice")  # first is now the most recently used
    store.put_clip("alice", clip())
    assert store.stats.evicted == 1
    with pytest.raises(AudioNotFoundError):
        store.get(second.id, "alice")
    for kept in (first, third):
        store.get(kept.id, "alice")
    assert store.stats.bytes <= store.max_bytes


def test_a_clip_is_found_by_its_content_for_its_owner_only():
    store = AudioStore(max_bytes=1 << 20, ttl_seconds=60)
    digest = store.digest("UklGRg==")
    entry = store.put_clip("alice", clip(), digest)
    assert store.find_clip("alice", digest) is entry
    assert store.find_clip("bob", digest) is None
    assert (store.stats.clips_encoded, store.stats.clips_reused) == (1, 1)
