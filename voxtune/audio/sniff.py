"""Detect an audio format from its first bytes (magic numbers), never from a file name."""

from __future__ import annotations

def sniff(data: bytes) -> str | None:
    """Return the format of `data` ("wav", "flac", "ogg" (Vorbis), "opus", "mp3", "mp4", "webm",
    "aac" (ADTS), "aiff", "caf"), or None when no known signature matches."""
    head = data[:64]
    if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        # The first page carries the codec's identification header.
        if b"OpusHead" in head:
            return "opus"
        if b"\x7fFLAC" in head:
            return "flac"
        return "ogg"
    if head[:4] == b"\x1aE\xdf\xa3":  # EBML: Matroska / WebM
        return "webm"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b"caff":
        return "caf"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF:
        # 12 sync bits; layer bits 00 mean ADTS AAC, anything else an MPEG audio frame.
        if head[1] & 0xF6 == 0xF0:
            return "aac"
        if head[1] & 0xE0 == 0xE0 and head[1] & 0x06 != 0:
            return "mp3"
    return None
