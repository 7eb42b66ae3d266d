"""The audio store: audio ids -> what a later turn needs of that audio, so it is never re-sent
or re-encoded.

A user clip is kept as its encoder output (the `AudioEmbedding` the LM reads); a spoken reply
as the text the model wrote (the LM reads its own turns as text). Every entry has one owner
(the API key that made it; another key cannot read it), an expiry time, and a size: when the
store is over its memory budget the least recently used entries go first.

Clips are also found by their content: a client that sends the same audio again (the usual
pattern: resend the whole history) gets the stored encoder output instead of a new encoding.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from voxtune.errors import InputError, echo
from voxtune.model.processor import AudioEmbedding


class AudioNotFoundError(InputError):
    """No audio by that id for this caller (never stored, expired, evicted, or someone else's)."""


@dataclass
class StoredAudio:
    """One entry: a user clip (`embedding`) or a spoken reply (`text`)."""

    id: str
    owner: str
    expires_at: int  # unix seconds
    embedding: AudioEmbedding | None = None
    text: str | None = None
    digest: str | None = None  # the clip's content hash, for finding it when it is sent again

    @property
    def nbytes(self) -> int:
        """Memory the entry holds."""
        size = len((self.text or "").encode()) + 256  # the record itself
        if self.embedding is not None:
            size += self.embedding.embeddings.numel() * self.embedding.embeddings.element_size()
        return size


@dataclass
class StoreStats:
    """Counters for /metrics."""

    entries: int = 0
    bytes: int = 0
    clips_encoded: int = 0  # user clips that went through the encoder
    clips_reused: int = 0  # user clips taken from the store (by id or by content) instead
    evicted: int = 0  # entries dropped for memory
    expired: int = 0  # entries dropped at their expiry time


class AudioStore:
    """A thread-safe, memory-bounded, expiring map of audio ids.

    Args:
        max_bytes: memory budget; the least recently used entries are dropped beyond it.
        ttl_seconds: how long an entry lives after it is stored.
        clock: the time source (unix seconds), replaceable in tests.
    """

    def __init__(self, *, max_bytes: int, ttl_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.stats = StoreStats()
        self._entries: OrderedDict[str, StoredAudio] = OrderedDict()
        self._by_digest: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._swept = float("-inf")  # when _expire last swept

    @staticmethod
    def digest(data: str | bytes) -> str:
        """The content hash a clip is found by."""
        return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()

    def put_clip(self, owner: str, embedding: AudioEmbedding, digest: str | None = None) -> StoredAudio:
        """Keep a user clip's encoder output; returns its entry (with a new id)."""
        with self._lock:
            self.stats.clips_encoded += 1
            return self._put(StoredAudio(new_audio_id(), owner, self._expiry(), embedding=embedding, digest=digest))

    def put_reply(self, owner: str, text: str, audio_id: str | None = None) -> StoredAudio:
        """Keep a spoken reply's text under `audio_id` (one from `new_audio_id`, for a reply
        whose id was sent before its text was whole) or a new id; returns its entry."""
        with self._lock:
            return self._put(StoredAudio(audio_id or new_audio_id(), owner, self._expiry(), text=text))

    def get(self, audio_id: str, owner: str) -> StoredAudio:
        """The entry `audio_id` if `owner` made it and it is still kept; else `AudioNotFoundError`."""
        with self._lock:
            self._expire()
            entry = self._entries.get(audio_id)
            if entry is not None and entry.expires_at <= self.clock():
                self._remove(audio_id)
                self.stats.expired += 1
                entry = None
            if entry is None or entry.owner != owner:  # someone else's id reads as unknown
                raise AudioNotFoundError(f"no audio with id {echo(audio_id)} (unknown, expired, or not yours)")
            self._entries.move_to_end(audio_id)
            if entry.embedding is not None:
                self.stats.clips_reused += 1
            return entry

    def find_clip(self, owner: str, digest: str) -> StoredAudio | None:
        """The stored clip of `owner` with this content hash, or None."""
        with self._lock:
            self._expire()
            audio_id = self._by_digest.get((owner, digest))
            if audio_id is not None and self._entries[audio_id].expires_at <= self.clock():
                self._remove(audio_id)
                self.stats.expired += 1
                audio_id = None
            if audio_id is None:
                return None
            self._entries.move_to_end(audio_id)
            self.stats.clips_reused += 1
            return self._entries[audio_id]

    # ---- internals (the lock is held) -------------------------------------------------------

    def _expiry(self) -> int:
        return int(self.clock() + self.ttl_seconds)

    def _put(self, entry: StoredAudio) -> StoredAudio:
        self._expire()
        self._entries[entry.id] = entry
        if entry.digest is not None:
            self._by_digest[entry.owner, entry.digest] = entry.id
        self.stats.entries += 1
        self.stats.bytes += entry.nbytes
        while self.stats.bytes > self.max_bytes and len(self._entries) > 1:
            self._remove(next(iter(self._entries)))
            self.stats.evicted += 1
        return entry

    def _expire(self) -> None:
        """Drop expired entries; a full sweep at most once a second (entries are checked on
        read anyway)."""
        now = self.clock()
        if now - self._swept < 1.0:
            return
        self._swept = now
        for audio_id in [i for i, e in self._entries.items() if e.expires_at <= now]:
            self._remove(audio_id)
            self.stats.expired += 1

    def _remove(self, audio_id: str) -> None:
        entry = self._entries.pop(audio_id)
        if entry.digest is not None and self._by_digest.get((entry.owner, entry.digest)) == audio_id:
            del self._by_digest[entry.owner, entry.digest]
        self.stats.entries -= 1
        self.stats.bytes -= entry.nbytes


def new_audio_id() -> str:
    """A fresh, unguessable audio id."""
    return "audio_" + secrets.token_hex(12)
