"""Audio: decide a file's format from its bytes, check it is whole and readable, and measure it.

The format comes from the bytes only, never from a URL or a server's Content-Type. A signature
picks one mutagen class (mutagen's own guessing leans on file names, and ``MP3()`` accepts
random bytes), and structural checks of our own catch what mutagen lets through: truncated WAV
and MP4 files, MP3 data without two consecutive valid frames, video-only MP4s.
"""

from __future__ import annotations

import io
import mmap
import os
import re
import struct
from dataclasses import dataclass

from mutagen import MutagenError
from mutagen.mp4 import Atoms, MP4Info, MP4NoTrackError
from mutagen.mp4._atom import AtomError

from .errors import AudioCorrupt, AudioTooLong, AudioTooShort, NotAudio, UnsupportedAudioFormat

# Content types useapi.net accepts, by the format that carries them; the first is canonical.
CONTENT_TYPES = {
    "wav": ("audio/wav", "audio/wave"),
    "mp3": ("audio/mpeg",),
    "flac": ("audio/flac", "audio/x-flac"),
    "m4a": ("audio/mp4", "audio/x-m4a"),
}
ACCEPTED_CONTENT_TYPES = tuple(ct for types in CONTENT_TYPES.values() for ct in types)
ACCEPTED = "WAV, MP3, FLAC or M4A/MP4 (AAC or ALAC)"
_HEAD = 4096


@dataclass(frozen=True)
class AudioInfo:
    """What the relay learned about an accepted file."""

    format: str
    content_type: str
    duration_seconds: float
    sample_rate: int | None
    channels: int | None
    bitrate: int | None
    size: int

    def as_fields(self) -> dict:
        """The answer's ``audio_*`` fields."""
        return {
            "audio_format": self.format,
            "audio_content_type": self.content_type,
            "audio_bytes": self.size,
            "audio_duration_seconds": round(self.duration_seconds, 3),
            "audio_sample_rate": self.sample_rate,
            "audio_channels": self.channels,
        }


def format_for_content_type(content_type: str) -> str | None:
    """The format a content type names (``audio/x-m4a`` → ``m4a``), or ``None``."""
    for fmt, types in CONTENT_TYPES.items():
        if content_type.lower() in types:
            return fmt
    return None


def probe(path: str, min_seconds: float = 0.0, max_seconds: float = 0.0) -> AudioInfo:
    """Identify, check and measure the file at ``path``.

    Raises :class:`NotAudio`, :class:`UnsupportedAudioFormat`, :class:`AudioCorrupt`,
    :class:`AudioTooShort` or :class:`AudioTooLong` (these carry the fields known so far).
    """
    size = os.path.getsize(path)
    if size == 0:
        raise NotAudio("The file is empty (0 bytes). Check that the link points at the recording itself.")
    head, body = read_start(path)
    kind = sniff(head, body)
    readers = {"wav": _read_wav, "mp3": _read_mp3, "flac": _read_flac, "m4a": _read_mp4}
    if kind not in readers:
        _refuse(kind, head, size)
    info = readers[kind](path, size)
    fields = info.as_fields()
    if info.duration_seconds <= 0:
        raise AudioTooShort("The audio has no duration (no samples).", **fields)
    if info.duration_seconds < min_seconds:
        raise AudioTooShort(
            f"The audio is {info.duration_seconds:.2f} s long; at least {min_seconds:g} s is needed "
            "(RELAY_MIN_SECONDS). Use a longer recording.",
            **fields,
        )
    if max_seconds and info.duration_seconds > max_seconds:
        raise AudioTooLong(
            f"The audio is {info.duration_seconds:.1f} s long; at most {max_seconds:g} s is allowed "
            "(RELAY_MAX_SECONDS). Trim the recording.",
            **fields,
        )
    return info


def read_start(path: str) -> tuple[bytes, bytes]:
    """The first bytes of the file at ``path``, and the first bytes of its audio: after any ID3v2
    tags and the zero padding taggers leave after them (what :func:`sniff` takes)."""
    with open(path, "rb") as handle:
        head = handle.read(_HEAD)
        start = _id3v2_end(handle)
        handle.seek(start)
        body = handle.read(_HEAD)
        if start and body[:1] == b"\0":  # padding: look past it, within the MP3 sync search
            handle.seek(start)
            padded = handle.read(_MP3_SYNC_SEARCH)
            skipped = len(padded) - len(padded.lstrip(b"\0"))
            handle.seek(start + skipped)
            body = handle.read(_HEAD)
    return head, body


def sniff_start(head: bytes) -> str:
    """The format of a file from its first bytes alone, skipping ID3v2 tags that end inside
    ``head`` (``unknown`` when they run past it): for judging a file that is still arriving."""
    end = _id3v2_end(io.BytesIO(head))
    return "unknown" if end >= len(head) else sniff(head, head[end : end + _HEAD])


def sniff(head: bytes, body: bytes | None = None) -> str:
    """Name the format of a file from its first bytes (``body``: the bytes after any ID3v2 tags).

    Accepted: ``wav``, ``mp3``, ``flac``, ``m4a``. Others name what was found (``ogg-opus``,
    ``adts``, ``aiff``, ``html``, ``unknown``, …) so the refusal can say so.
    """
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] in (b"AVI ", b"WEBP"):
        return "video" if head[8:12] == b"AVI " else "image"
    if head[:4] == b"RF64" or head[:4] == b"RIFX":
        return "wav-rf64"
    if body is None:
        body = head
    if body[:4] == b"fLaC":
        return "flac"
    if head[4:8] == b"ftyp":
        return "image" if head[8:12] in (b"heic", b"heix", b"mif1", b"avif") else "m4a"
    if head[:4] == b"OggS":
        if b"OpusHead" in head:
            return "ogg-opus"
        if b"\x01vorbis" in head:
            return "ogg-vorbis"
        return "ogg-flac" if b"FLAC" in head else "ogg"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[:6] == b"#!AMR\n" or head[:9] == b"#!AMR-WB\n":
        return "amr"
    if head[:4] == b"caff":
        return "caf"
    if head[:16] == _ASF_GUID:
        return "asf"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free") and head[:4] != b"RIFF":
        return "mov"  # QuickTime files older than the ftyp box
    if head[:4] == b".snd":
        return "au"
    if head[:4] == b"wvpk":
        return "wavpack"
    if head[:4] == b"MAC ":
        return "ape"
    if head[:4] == b"MThd":
        return "midi"
    if len(body) >= 2 and body[0] == 0xFF and (body[1] & 0xF6) == 0xF0:
        return "adts"
    frame = _mpeg_frame(body, 0)
    if frame is not None:
        return "mp3" if frame.layer == 3 else f"mp{frame.layer}"
    kind = _not_audio_kind(head)
    if kind == "unknown" and _find_mp3_sync(body, 0, len(body)) is not None:
        return "mp3"  # a stream cut in the middle of a frame: two whole frames follow
    return kind


_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
_UNSUPPORTED_NAMES = {
    "asf": "Windows Media (WMA/ASF)",
    "mov": "QuickTime MOV",
    "ogg-opus": "Ogg Opus",
    "ogg-vorbis": "Ogg Vorbis",
    "ogg-flac": "Ogg FLAC",
    "ogg": "Ogg",
    "aiff": "AIFF",
    "webm": "WebM/Matroska",
    "amr": "AMR",
    "caf": "Apple CAF",
    "au": "Sun AU",
    "wavpack": "WavPack",
    "ape": "Monkey's Audio",
    "midi": "MIDI (notes, not a recording)",
    "adts": "raw AAC (ADTS stream)",
    "mp1": "MPEG layer I",
    "mp2": "MPEG layer II (MP2)",
    "wav-rf64": "RF64/RIFX WAV",
}
_NOT_AUDIO_NAMES = {
    "html": "an HTML web page",
    "xml": "an XML document",
    "json": "a JSON document",
    "pdf": "a PDF document",
    "png": "a PNG image",
    "jpeg": "a JPEG image",
    "gif": "a GIF image",
    "image": "an image",
    "video": "an AVI video",
    "zip": "a ZIP archive (or an Office document)",
    "text": "plain text",
    "unknown": "data in no audio format the relay knows",
}


def is_recording(kind: str) -> bool:
    """Whether :func:`sniff` named a recording (in a format useapi takes or not), rather than a
    document, a picture, notes (MIDI) or nothing it knows. MPEG layers I and II are left out: any
    two bytes from 0xFFF0 up read as one of their frame headers (a UTF-16 text's 0xFFFE does)."""
    return kind == "video" or (kind not in _NOT_AUDIO_NAMES and kind not in ("midi", "mp1", "mp2"))


def _refuse(kind: str, head: bytes, size: int):
    if kind in _UNSUPPORTED_NAMES:
        raise UnsupportedAudioFormat(
            f"The file is {_UNSUPPORTED_NAMES[kind]}, which useapi.net does not accept. "
            f"Convert it to {ACCEPTED} first.",
            audio_bytes=size,
        )
    message = f"Expected audio but received {_NOT_AUDIO_NAMES.get(kind, kind)} ({size} bytes)"
    if kind == "html":
        title = re.search(rb"<title[^>]*>(.*?)</title>", head, re.I | re.S)
        if title:
            message += f" titled {title.group(1).decode('utf-8', 'replace').strip()[:80]!r}"
        message += (
            ": a web page (a login, preview or virus-scan page), not the recording. From a link: share "
            "the file publicly and use its direct download link; as a file: attach the recording itself"
        )
    elif kind == "xml" and b"<Error>" in head:
        code = re.search(rb"<Code>([^<]{1,60})</Code>", head)
        message += f": a storage error ({code.group(1).decode('ascii', 'replace') if code else 'unknown'})"
        message += ". The signed URL may have expired or the object is private"
    raise NotAudio(message + ".", audio_bytes=size)


def _not_audio_kind(head: bytes) -> str:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:512]:
        return "html"
    if text.startswith(b"<?xml") or text.startswith(b"<error"):
        return "xml"
    if text[:1] in (b"{", b"["):
        return "json"
    signatures = {
        b"%PDF": "pdf",
        b"\x89PNG": "png",
        b"\xff\xd8\xff": "jpeg",
        b"GIF8": "gif",
        b"PK\x03\x04": "zip",
    }
    for magic, kind in signatures.items():
        if head.startswith(magic):
            return kind
    try:
        sample = head[:512].decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    return "text" if sample and all(ch.isprintable() or ch in "\r\n\t" for ch in sample) else "unknown"


# --- WAV -----------------------------------------------------------------------------------


# WAV encodings whose length mutagen counts right and useapi is sent as they are: PCM, float,
# A-law, µ-law. Others (ADPCM, GSM, MP3 in a WAV…) are converted, or refused with conversion off.
_WAV_TAGS = (1, 3, 6, 7)
_WAV_TAG_NAMES = {2: "MS ADPCM", 0x11: "IMA ADPCM", 0x31: "GSM 6.10", 0x50: "MPEG audio", 0x55: "MP3"}


def unknown_wav_length(declared: int) -> bool:
    """Whether a WAV's declared data size means "until the end of the file": 0 or 0xFFFFFFFF from
    a stream, or a placeholder near 2 GiB (sox writing to a pipe declares 0x7FFFF000)."""
    return declared in (0, 0xFFFFFFFF) or declared >= 0x7FFF0000


# A recording's file holds a handful of structures (chunks, metadata blocks, boxes, tags); past
# these counts it is damaged or made to stall a server: the metadata library builds an object for
# each, in this process (millions of empty ones cost seconds of CPU and a gigabyte of memory).
MAX_STRUCTURES = 256
MAX_MP4_ATOMS = 10_000  # inside the index ('moov'): a long recording's tables are data, not atoms
MAX_ID3_TAGS = 16


def _too_many(what: str, limit: int, size: int) -> AudioCorrupt:
    return AudioCorrupt(
        f"The file holds more than {limit} {what}, where a recording holds a handful: it is damaged or was made "
        "to stall a server. Export or record it again.",
        audio_bytes=size,
    )


def _read_wav(path: str, size: int) -> AudioInfo:
    with open(path, "rb") as handle:
        handle.seek(12)
        data_declared = data_offset = None
        tag = None
        fmt = None  # (channels, sample rate, byte rate, block align, bits) from the 'fmt ' chunk
        chunks = 0
        while True:  # every chunk, those after the data too: each is counted
            header = handle.read(8)
            if len(header) < 8:
                break
            chunks += 1
            if chunks > MAX_STRUCTURES:
                raise _too_many("WAV chunks", MAX_STRUCTURES, size)
            chunk_id, chunk_size = header[:4], struct.unpack("<I", header[4:])[0]
            if chunk_id == b"fmt " and data_offset is None:
                fields = handle.read(min(chunk_size, 26))
                handle.seek(-len(fields), os.SEEK_CUR)
                tag = struct.unpack("<H", fields[:2])[0] if len(fields) >= 2 else 0
                if len(fields) >= 16:
                    fmt = struct.unpack("<HIIHH", fields[2:16])
                if tag == 0xFFFE and len(fields) >= 26:  # EXTENSIBLE: the sub-format GUID's first two bytes
                    tag = struct.unpack("<H", fields[24:26])[0]
            if chunk_id == b"data" and data_offset is None:
                data_declared, data_offset = chunk_size, handle.tell()
                if unknown_wav_length(chunk_size):
                    break  # the samples run to the end: nothing after them
            handle.seek(chunk_size + (chunk_size & 1), os.SEEK_CUR)
    if tag is None or data_offset is None:
        raise AudioCorrupt("The WAV file has no 'fmt ' or 'data' chunk: it is truncated or damaged.", audio_bytes=size)
    if tag not in _WAV_TAGS:
        raise UnsupportedAudioFormat(
            f"The WAV file holds {_WAV_TAG_NAMES.get(tag, f'compressed (format 0x{tag:04x})')} audio, which "
            f"useapi.net may not read. Convert it to {ACCEPTED} first (with convert=auto the relay does).",
            audio_bytes=size,
        )
    available = size - data_offset
    unknown = unknown_wav_length(data_declared)
    if not unknown and data_declared > available:
        raise AudioCorrupt(
            f"The WAV file is truncated: its header promises {data_declared} bytes of audio, "
            f"only {available} arrived. Upload the complete file.",
            audio_bytes=size,
        )
    if fmt is None or not all(fmt[:2]) or not fmt[3]:
        raise AudioCorrupt(
            "The WAV file's 'fmt ' chunk cannot be read (no channels, sample rate or block size): it is damaged. "
            "Export or download it again.",
            audio_bytes=size,
        )
    # Measured from the chunks read above (the metadata library would also parse an 'id3 ' chunk's
    # tags, whose cost a crafted file can make minutes). A recorder killed before it wrote its sizes
    # leaves them 0 (or all ones): the data then runs to the end of the file.
    channels, rate, byte_rate, block_align, _bits = fmt
    data_bytes = available if unknown else data_declared
    length = (data_bytes // block_align) / rate
    return AudioInfo("wav", "audio/wav", length, rate, channels, byte_rate * 8, size)


# --- FLAC ----------------------------------------------------------------------------------


def _count_flac_blocks(path: str, size: int) -> bytes | None:
    """Walk the metadata blocks (refused past :data:`MAX_STRUCTURES`); the STREAMINFO block's data
    (the first block), or None when there is none."""
    streaminfo = None
    with open(path, "rb") as handle:
        offset = _id3v2_end(handle)
        handle.seek(offset)
        if handle.read(4) != b"fLaC":
            return None
        offset += 4
        for number in range(MAX_STRUCTURES):
            handle.seek(offset)
            header = handle.read(4)
            if len(header) < 4:
                return streaminfo
            length = int.from_bytes(header[1:4], "big")
            if offset + 4 + length > size:
                raise AudioCorrupt(
                    "The FLAC file is truncated: a metadata block runs past the end of the file. Upload the "
                    "complete file.",
                    audio_bytes=size,
                )
            if number == 0 and header[0] & 0x7F == 0:
                streaminfo = handle.read(min(length, 34))
            offset += 4 + length
            if header[0] & 0x80:  # the last metadata block
                return streaminfo
        raise _too_many("FLAC metadata blocks", MAX_STRUCTURES, size)


def _read_flac(path: str, size: int) -> AudioInfo:
    streaminfo = _count_flac_blocks(path, size)
    if streaminfo is None or len(streaminfo) < 18:
        raise AudioCorrupt(
            "The FLAC file cannot be read (truncated or damaged): its STREAMINFO block is missing.", audio_bytes=size
        )
    # Read directly (the metadata library would parse every comment and picture: a crafted 16 MiB
    # comment block cost seconds): sample rate (20 bits), channels (3), bits (5), samples (36).
    packed = int.from_bytes(streaminfo[10:18], "big")
    rate, channels, total = packed >> 44, ((packed >> 41) & 0x7) + 1, packed & ((1 << 36) - 1)
    if not rate:
        raise AudioCorrupt(
            "The FLAC file cannot be read (truncated or damaged): its sample rate is 0.", audio_bytes=size
        )
    if not total:
        # An encoder writing to a pipe cannot go back to fill in the length: useapi.net may take such
        # a file for empty. Re-encoded (losslessly) with its length when conversion is on.
        raise UnsupportedAudioFormat(
            "The FLAC file does not say how long it is (it was written to a pipe), and useapi.net may take it "
            "for empty. Export it to a file again, or send it with convert=auto: the relay rewrites it losslessly.",
            audio_bytes=size,
        )
    length = total / rate
    return AudioInfo("flac", "audio/flac", length, rate, channels, int(size * 8 / length), size)


# --- MP4 / M4A -----------------------------------------------------------------------------

# AAC (MPEG-4, and MPEG-2's three profiles) and ALAC; "mp4a.6B"/"mp4a.69" is MP3 in an MP4.
_AUDIO_CODECS = ("mp4a.40", "mp4a.66", "mp4a.67", "mp4a.68", "alac")
_MP4_CODEC_NAMES = {"mp4a.69": "MP3", "mp4a.6b": "MP3"}


def _read_mp4(path: str, size: int) -> AudioInfo:
    boxes = _top_level_boxes(path, size)
    if b"moov" not in boxes:
        raise AudioCorrupt(
            "The MP4/M4A file has no 'moov' index: it is truncated or still being written. Upload the complete file.",
            audio_bytes=size,
        )
    if b"moof" in boxes:  # what browsers' recorders write: the length is spread over fragments
        raise UnsupportedAudioFormat(
            "The MP4/M4A file is fragmented (as browsers and streaming tools write it), which useapi.net may "
            f"not read. Convert it to {ACCEPTED} first (with convert=auto the relay does).",
            audio_bytes=size,
        )
    _count_mp4_atoms(path, size)
    try:
        info = _mp4_info(path)
    except (MutagenError, AtomError, struct.error, ValueError) as err:
        raise AudioCorrupt(f"The MP4/M4A file cannot be read: {err}.", audio_bytes=size) from None
    if not info.sample_rate:
        raise NotAudio("The MP4 file has no audio track (video only). Send the audio itself.", audio_bytes=size)
    codec = (info.codec or "").lower()
    with open(path, "rb") as handle:
        quicktime = handle.read(12)[4:12] == b"ftypqt  "
    if codec == "mp4a" or (quicktime and not codec.startswith(_AUDIO_CODECS)):
        # QuickTime keeps an AAC track's object type where this reader does not look, or holds PCM
        raise UnsupportedAudioFormat(
            "The file is a QuickTime movie (MOV), and useapi.net takes AAC or ALAC audio in an M4A. Send it with "
            "convert=auto (the relay makes an M4A of it, without re-encoding AAC), or export it as M4A.",
            audio_bytes=size,
        )
    if not codec.startswith(_AUDIO_CODECS):
        raise UnsupportedAudioFormat(
            f"The MP4 file's audio is {_MP4_CODEC_NAMES.get(codec) or info.codec_description or info.codec}, which "
            "useapi.net does not accept in an MP4. "
            f"Convert it to {ACCEPTED} first.",
            audio_bytes=size,
        )
    return AudioInfo("m4a", "audio/mp4", info.length, info.sample_rate, info.channels, info.bitrate, size)


def _mp4_info(path: str) -> MP4Info:
    """The stream's info alone: the metadata library's tags and chapters are never parsed (a crafted
    tag item of millions of empty atoms cost seconds and a gigabyte)."""
    info = MP4Info()
    with open(path, "rb") as handle:
        atoms = Atoms(handle)
        try:
            info.load(atoms, handle)
        except MP4NoTrackError:
            pass  # no audio track: sample_rate stays 0
    return info


def _box_name(name: bytes) -> bool:
    """Four printable ASCII characters, as every MP4 box name is."""
    return len(name) == 4 and all(32 <= c < 127 for c in name)


def _top_level_boxes(path: str, size: int) -> list[bytes]:
    names: list[bytes] = []
    offset = 0
    with open(path, "rb") as handle:
        while offset < size:
            handle.seek(offset)
            header = handle.read(16)
            whole = b"moov" in names and b"mdat" in names
            if whole and (len(header) < 8 or not _box_name(header[4:8])):
                break  # bytes after a complete file (a copy or sync tool's padding): players ignore them
            if len(header) < 8:
                raise AudioCorrupt("The MP4/M4A file ends in the middle of a box: it is truncated.", audio_bytes=size)
            box_size, name = struct.unpack(">I4s", header[:8])
            if box_size == 1:
                if len(header) < 16:
                    raise AudioCorrupt("The MP4/M4A file is truncated.", audio_bytes=size)
                box_size = struct.unpack(">Q", header[8:16])[0]
            elif box_size == 0:
                box_size = size - offset
            if box_size < 8 or offset + box_size > size:
                if whole:
                    break
                raise AudioCorrupt(
                    f"The MP4/M4A file is truncated: its '{name.decode('latin-1')}' box runs past the end of "
                    "the file. Upload the complete file.",
                    audio_bytes=size,
                )
            names.append(name)
            if name == b"moof":  # fragmented: the converter (in its limited process) reads the rest
                return names
            if len(names) > MAX_STRUCTURES:
                raise _too_many("top-level MP4 boxes", MAX_STRUCTURES, size)
            offset += box_size
    return names


# The boxes the metadata library reads the children of (with 'meta', after its 4-byte version).
_MP4_CONTAINERS = {b"moov", b"udta", b"trak", b"mdia", b"meta", b"ilst", b"stbl", b"minf"}


def _count_mp4_atoms(path: str, size: int) -> None:
    """Count the atoms inside container boxes, as the metadata library would build them; refuse past
    :data:`MAX_MP4_ATOMS`. Boxes that do not fit are left to the readers to judge."""
    count = 0
    with open(path, "rb") as handle:
        pending = [(0, size, True)]  # (start, end, top level)
        while pending:
            start, end, top = pending.pop()
            offset = start
            while offset + 8 <= end:
                handle.seek(offset)
                header = handle.read(16)
                box_size, name = struct.unpack(">I4s", header[:8])
                head = 8
                if box_size == 1 and len(header) >= 16:
                    box_size, head = struct.unpack(">Q", header[8:16])[0], 16
                elif box_size == 0:
                    box_size = end - offset
                if box_size < head or offset + box_size > end:
                    break
                if not top:
                    count += 1
                    if count > MAX_MP4_ATOMS:
                        raise _too_many("atoms in the MP4 index", MAX_MP4_ATOMS, size)
                if top and name == b"moof":  # fragments are the converter's
                    break
                if name in _MP4_CONTAINERS:
                    skip = 4 if name == b"meta" else 0
                    pending.append((offset + head + skip, offset + box_size, False))
                offset += box_size


# --- MP3 -----------------------------------------------------------------------------------

_MP3_BITRATES = {
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_L2_BITRATES = (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384)
_L1_BITRATES = (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448)
_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_MP3_SYNC_SEARCH = 64 * 1024
_MP3_RESYNC_LIMIT = 1024 * 1024  # a damaged stretch longer than this ends the count: a walk in Python is slow
# Would-be frame headers checked in Python over the whole walk: past this the count ends too (a file
# made of a few good frames between long runs of would-be headers kept a worker busy for 19 s of
# CPU). Real damage and cover art hold few: JPEG and PNG data rarely look like a layer III header.
_MP3_CANDIDATES = 100_000
# A layer III frame header's first two bytes (MPEG 1, 2 or 2.5; with or without CRC), found by the
# regular expression engine: a run of 0xFF bytes is skipped without a Python step per byte.
_MP3_SYNC = re.compile(rb"\xff[\xe2\xe3\xf2\xf3\xfa\xfb]")


@dataclass(frozen=True)
class _Frame:
    layer: int
    length: int
    samples: int
    sample_rate: int
    channels: int
    bitrate: int


def _mpeg_frame(data, offset: int) -> _Frame | None:
    """Parse the MPEG audio frame header at ``offset``, or ``None`` when there is none."""
    if offset + 4 > len(data):
        return None
    b0, b1, b2, b3 = data[offset], data[offset + 1], data[offset + 2], data[offset + 3]
    if b0 != 0xFF or (b1 & 0xE0) != 0xE0:
        return None
    version, layer_bits = (b1 >> 3) & 3, (b1 >> 1) & 3
    bitrate_index, rate_index, padding = b2 >> 4, (b2 >> 2) & 3, (b2 >> 1) & 1
    if version == 1 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    layer = 4 - layer_bits
    mpeg1 = version == 3
    sample_rate = _SAMPLE_RATES[version][rate_index]
    if layer == 3:
        kbps = _MP3_BITRATES[1 if mpeg1 else 2][bitrate_index]
        samples = 1152 if mpeg1 else 576
        length = (144000 if mpeg1 else 72000) * kbps // sample_rate + padding
    elif layer == 2:
        kbps = _L2_BITRATES[bitrate_index] if mpeg1 else _MP3_BITRATES[2][bitrate_index]
        samples, length = 1152, 144000 * kbps // sample_rate + padding
    else:
        kbps = _L1_BITRATES[bitrate_index] if mpeg1 else _MP3_BITRATES[2][bitrate_index]
        samples, length = 384, (12000 * kbps // sample_rate + padding) * 4
    channels = 1 if (b3 >> 6) == 3 else 2
    return _Frame(layer, length, samples, sample_rate, channels, kbps * 1000)


def _id3v2_end(handle) -> int:
    """Offset of the first byte after the ID3v2 tag(s) at the start of the file (0 if none)."""
    offset = 0
    for _ in range(MAX_ID3_TAGS):  # some taggers write more than one tag; a chain of thousands is no recording
        handle.seek(offset)
        header = handle.read(10)
        if len(header) < 10 or header[:3] != b"ID3":
            return offset
        b = header[6:10]
        # Syncsafe (7 bits a byte), as the standard says; a tagger that wrote a plain integer sets a high bit.
        length = (
            int.from_bytes(b, "big") if any(x & 0x80 for x in b) else (b[0] << 21) | (b[1] << 14) | (b[2] << 7) | b[3]
        )
        offset += 10 + length + (10 if header[5] & 0x10 else 0)
    return offset


def _read_mp3(path: str, size: int) -> AudioInfo:
    """Walk every frame: exact duration (VBR files without a Xing header included) and a real check."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = _id3v2_end(handle)
        first = _find_mp3_sync(data, start, size)
        if first is None:
            raise AudioCorrupt(
                "The file looks like MP3 but no two consecutive MPEG audio frames were found: it is damaged "
                "or not MP3.",
                audio_bytes=size,
            )
        offset, frames, duration, bits = first, 0, 0.0, 0
        frame = _mpeg_frame(data, offset)
        rate, channels = frame.sample_rate, frame.channels
        lost = 0  # bytes searched since the last good frame
        budget = [_MP3_CANDIDATES]  # would-be headers left to check
        while offset < size:
            # A last frame cut short is not counted: only audio that arrived has a duration.
            if frame is not None and frame.layer == 3 and offset + frame.length <= size:
                frames += 1
                duration += frame.samples / frame.sample_rate  # joined files may change rate
                bits += frame.length * 8
                offset += frame.length
                lost = 0
            else:  # a damaged spot (or a tag at the end): go on from the next two good frames, as players do
                found = _find_mp3_sync(data, offset + 1, size, budget)
                if found is None:
                    lost += _MP3_SYNC_SEARCH
                    # Past 1 MiB without a frame (or at the end), the rest is not audio: stop counting.
                    if offset + _MP3_SYNC_SEARCH >= size or lost >= _MP3_RESYNC_LIMIT or budget[0] <= 0:
                        break
                    offset += _MP3_SYNC_SEARCH - 4  # search the next window
                    frame = None
                    continue
                lost += found - offset
                offset = found
            frame = _mpeg_frame(data, offset)
    bitrate = int(bits / duration) if duration else None
    return AudioInfo("mp3", "audio/mpeg", duration, rate, channels, bitrate, size)


def _find_mp3_sync(data, start: int, size: int, budget: list[int] | None = None) -> int | None:
    """The first offset (within 64 KiB of ``start``) where two consecutive layer III frames agree.
    ``budget``: would-be headers still allowed to be checked (decremented; None when it runs out)."""
    end = min(size, start + _MP3_SYNC_SEARCH)
    for match in _MP3_SYNC.finditer(data, start, end):
        if budget is not None:
            if budget[0] <= 0:
                return None
            budget[0] -= 1
        offset = match.start()
        frame = _mpeg_frame(data, offset)
        if frame is not None and frame.layer == 3:
            following = _mpeg_frame(data, offset + frame.length)
            if offset + frame.length >= size or (
                following is not None and following.layer == 3 and following.sample_rate == frame.sample_rate
            ):
                if offset + frame.length <= size:
                    return offset
    return None
