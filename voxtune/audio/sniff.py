"""Detect an audio format from its first bytes (magic numbers), never from a file name."""

from __future__ import annotations


def container_magic(data: bytes) -> str | None:
    """The format named by an unambiguous file signature ("wav", "flac", "ogg" (Vorbis), "opus",
    "webm", "mp4", "aiff", "caf", or "mp3"/"aac" behind an ID3 tag), else None.

    Raw MPEG and ADTS frames are left out: their 12-bit sync word also starts about one in ten
    chunks of headerless PCM, so they are no proof that data is not PCM.
    """
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
    if head[:3] == b"ID3" and len(data) >= 10:
        # An ID3v2 tag (size: four 7-bit bytes) usually fronts MP3, sometimes ADTS AAC.
        size = 10 + ((data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F))
        return "aac" if _frame_sync(data[size : size + 2]) == "aac" else "mp3"
    return None


def sniff(data: bytes) -> str | None:
    """Return the format of `data`: a `container_magic` format, or "mp3" / "aac" (ADTS) from a
    bare frame sync; None when nothing matches."""
    return container_magic(data) or _frame_sync(data[:2])


def _frame_sync(head: bytes) -> str | None:
    if len(head) < 2 or head[0] != 0xFF:
        return None
    # 12 sync bits; layer bits 00 mean ADTS AAC, anything else an MPEG audio frame.
    if head[1] & 0xF6 == 0xF0:
        return "aac"
    if head[1] & 0xE0 == 0xE0 and head[1] & 0x06 != 0:
        return "mp3"
    return None
