"""Convert: turn any common recording into a file useapi.net takes, and measure its level.

:func:`prepare` is what the pipeline calls with a spooled file. An accepted audio-only file (WAV,
MP3, FLAC, M4A) is sent byte for byte; anything else the relay recognises by its first bytes (Ogg,
WebM/Matroska, ADTS AAC, AIFF/AIFC, AMR, 3GP/3G2, CAF, WMA, MP4/MOV/MKV/AVI with a video track, …)
is converted, quality first:

- AAC or ALAC audio (in MP4, MOV, 3GP/3G2, CAF, Matroska or raw ADTS) is remuxed into M4A, and MP3
  audio (in AVI or Matroska) into MP3, without re-encoding;
- everything else is decoded and encoded as FLAC (lossless: nothing is lost beyond what the source
  codec already lost), at the source's sample rate and channels; 16-bit unless the source is
  lossless with more than 16 bits (then 24-bit). More than 8 channels (FLAC's limit) are mixed to stereo;
- a video track is never sent.

Every file's level is measured over its whole length (peak and RMS in dBFS); a file whose peak
stays below ``RELAY_SILENCE_DBFS`` is refused (:class:`AudioSilent`) before it costs a clone.

Decoding untrusted media happens in a child process (``python -m relay.convert``) that limits its
own CPU time, address space and file size before it loads FFmpeg (PyAV); the parent bounds its
wall time and kills it past that. FFmpeg gets an open file object and a demuxer chosen from the
file's signature, never a path or a URL: it probes nothing and opens nothing else (the protocol
whitelist is empty, so playlists, references and network protocols fail). The output is bounded
in duration and bytes while it is written. A PCM WAV, the common large case, is measured in this
process with numpy, block by block (no FFmpeg involved), so it costs milliseconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from . import audio
from .errors import (
    AudioCorrupt,
    AudioSilent,
    AudioTooLong,
    DecodeLimitExceeded,
    NotAudio,
    RelayError,
    UnsupportedAudioFormat,
)

# The demuxer FFmpeg must use for each kind :func:`relay.audio.sniff` names (never its own probing).
DEMUXERS = {
    "wav": "wav",
    "mp3": "mp3",
    "flac": "flac",
    "m4a": "mov",
    "mov": "mov",
    "ogg-opus": "ogg",
    "ogg-vorbis": "ogg",
    "ogg-flac": "ogg",
    "ogg": "ogg",
    "webm": "matroska",
    "adts": "aac",
    "aiff": "aiff",
    "amr": "amr",
    "caf": "caf",
    "asf": "asf",
    "video": "avi",
    "au": "au",
    "wavpack": "wv",
    "ape": "ape",
    "mp1": "mp3",
    "mp2": "mp3",
    "wav-rf64": "wav",
}
FLOOR_DBFS = -120.0  # reported for digital silence (a level of zero has no logarithm)
DAMAGED_SHARE = 0.1  # more undecodable frames than this share is a damaged file, not a few glitches
CLIPPING_WARN = 0.001  # share of samples at full scale that is "heavy clipping"
LOW_RMS_DBFS = -40.0  # quieter than this (RMS) earns a warning
_WAV_BLOCK = 1 << 18  # samples measured at once: bounded memory whatever the file's size


@dataclass(frozen=True)
class Levels:
    """Peak and RMS over a whole recording, and the share of samples at full scale."""

    peak: float  # 0..1 (full scale = 1)
    rms: float
    clipped: float  # 0..1

    @property
    def peak_dbfs(self) -> float:
        return _dbfs(self.peak)

    @property
    def rms_dbfs(self) -> float:
        return _dbfs(self.rms)


def _dbfs(value: float) -> float:
    return round(max(20 * math.log10(value), FLOOR_DBFS), 1) if value > 0 else FLOOR_DBFS


@dataclass
class Prepared:
    """What to upload: ``path`` (the spool file itself, or a converted file), described by ``info``."""

    path: str
    info: audio.AudioInfo
    source_format: str
    converted: bool
    levels: Levels | None
    warnings: list[str] = field(default_factory=list)

    def as_fields(self) -> dict:
        """The answer's ``audio_*``, ``source_format`` and ``converted`` fields."""
        return {
            **self.info.as_fields(),
            "source_format": self.source_format,
            "converted": self.converted,
            "audio_peak_dbfs": None if self.levels is None else self.levels.peak_dbfs,
            "audio_rms_dbfs": None if self.levels is None else self.levels.rms_dbfs,
        }


def prepare(
    path: str, settings, convert: str = "auto", workdir: str | None = None, meter: LevelMeter | None = None
) -> Prepared:
    """Decide what to send for the spooled file at ``path``; convert it when needed.

    ``convert``: the request's ``auto`` or ``never`` (``RELAY_CONVERT=off`` is ``never`` for all).
    ``meter``: what measured the file while it downloaded (a WAV is then not read again).
    A converted file is written into ``workdir`` (default: the temporary directory); the caller
    removes ``Prepared.path`` when it differs from ``path``. Raises the :mod:`relay.audio`
    refusals, :class:`AudioSilent`, :class:`AudioTooLong` and :class:`DecodeLimitExceeded`.
    """
    allowed = convert != "never" and settings.convert == "auto"
    kind, head = _sniff_path(path)
    source = source_name(kind, head)
    info: audio.AudioInfo | None = None
    if kind in audio.CONTENT_TYPES:
        try:
            info = audio.probe(path, settings.min_seconds, settings.max_seconds)
        except UnsupportedAudioFormat:  # audio useapi may not take in an accepted container: AMR, PCM or
            # Opus in an MP4, a fragmented MP4, an ADPCM WAV…: FFmpeg reads it, and sends a plain file
            if not (allowed and kind in ("m4a", "wav", "flac")):
                raise
    elif not (allowed and kind in DEMUXERS):
        audio.probe(path, settings.min_seconds, settings.max_seconds)  # raises the refusal, as without conversion
        raise UnsupportedAudioFormat(audio_bytes=os.path.getsize(path))  # pragma: no cover - probe raised
    if info is not None and kind == "wav":
        levels = meter.levels(os.path.getsize(path)) if meter is not None else None
        levels = levels or wav_levels(path)
        if levels is None:  # not plain PCM: let FFmpeg decode it, in the child
            levels = _levels_of(_run_child(path, None, "wav", settings, convert=False))
        return _checked(Prepared(path, info, source, False, levels), settings)
    # An M4A/MP4 is converted only to drop a video track; MOV and 3GP/3G2 become plain M4A.
    may_convert = allowed and (info is None or kind == "m4a")
    out = None
    if may_convert:
        from .fetch import new_spool_path  # here, not at the top: the child process needs none of it

        out = new_spool_path(workdir)  # named like a spool, so a killed process's leftovers are swept
    try:
        try:
            result = _run_child(
                path,
                out,
                DEMUXERS[kind],
                settings,
                convert=may_convert,
                source=source,
                only_video=info is not None and source in ("m4a", "mp4"),
            )
        except RelayError as err:  # what was learned of the file before stays in the answer
            for name, value in ({**info.as_fields(), "source_format": source} if info else {}).items():
                err.fields.setdefault(name, value)
            raise
        levels = _levels_of(result)
        if not result["converted"]:
            if info is None:  # pragma: no cover - the child converts whatever has no info
                raise UnsupportedAudioFormat(audio_bytes=os.path.getsize(path))
            extra = [f"{result['tracks']} audio tracks"] if result.get("tracks", 1) > 1 else []
            extra += ["a video track"] if result.get("had_video") else []
            if extra:  # sent as it is, useapi.net would get all of it, and may take its first track
                raise UnsupportedAudioFormat(
                    f"The {source.upper()} file has {' and '.join(extra)}, and conversion is off (convert=never "
                    "or RELAY_CONVERT=off): useapi.net would receive all of it. Send it with convert=auto (the "
                    "relay keeps the voiced audio track alone), or export the audio on its own.",
                    **info.as_fields(),
                    source_format=source,
                )
            missing = info.duration_seconds - result.get("seconds", info.duration_seconds)
            if kind in ("flac", "m4a") and missing > max(1.0, 0.05 * info.duration_seconds):  # over 1 s and 5 %
                # The decoder found less than the header claims (a cut file whose audio box runs "to the
                # end"): the answer would claim the header's length, and useapi would get the rest only.
                raise AudioCorrupt(
                    f"The {kind.upper()} file is truncated: its header says {info.duration_seconds:.1f} s, and only "
                    f"{result['seconds']:.1f} s of audio is there. Upload the complete file.",
                    **{**info.as_fields(), "audio_duration_seconds": round(result["seconds"], 2)},
                )
            if kind == "m4a" and result.get("channels") and result["channels"] != info.channels:
                # MP4 muxers write 2 channels in the track's header whatever the stream holds.
                info = dataclasses.replace(info, channels=result["channels"])
            prepared = Prepared(path, info, source, False, levels)
            _note_damage(prepared, result, sent_as_is=True)
            return _checked(prepared, settings)
        assert out is not None
        try:
            sent = audio.probe(out, settings.min_seconds, settings.max_seconds)
        except AudioCorrupt as err:  # our own output failed our check: a bug, not the caller's file
            raise RelayError(f"The converted file failed validation: {err.message}") from None
        except RelayError as err:
            err.fields.update(source_format=source, converted=True)
            raise
        prepared = Prepared(out, sent, source, True, levels)
        prepared.warnings.append(_conversion_note(source, result, sent))
        _note_damage(prepared, result, sent_as_is=False)
        out = None  # handed to the caller
        return _checked(prepared, settings)
    finally:
        if out is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out)


def _conversion_note(source: str, result: dict, sent: audio.AudioInfo) -> str:
    how = "remuxed without re-encoding into" if result.get("remuxed") else "decoded and stored losslessly as"
    kept = []
    if result.get("tracks", 1) > 1:
        kept.append(f"audio track {result['track']} of {result['tracks']} kept")
    if result.get("had_video"):
        kept.append("video track dropped")
    if result.get("mixed_from"):
        kept.append(f"its {result['mixed_from']} channels mixed to stereo: FLAC holds at most 8")
    said = f" ({', '.join(kept)})" if kept else ""
    return f"The {source.upper()} file was {how} {sent.format.upper()}{said} before upload."


def _note_damage(prepared: Prepared, result: dict, sent_as_is: bool) -> None:
    """Frames the decoder could not read: a warning, or :class:`AudioCorrupt` when so many are
    damaged that what useapi.net would clone is mostly gaps."""
    errors = result.get("decode_errors") or 0
    if not errors:
        return
    total = errors + (result.get("frames") or 0)
    if errors > DAMAGED_SHARE * total:
        raise AudioCorrupt(
            f"{errors} of the {total} audio frames cannot be decoded: the file is damaged. Send the original "
            "recording, or export or download it again.",
            **prepared.as_fields(),
        )
    prepared.warnings.append(
        f"{errors} damaged or undecodable frames "
        + (
            "were left as they are: useapi.net receives the file unchanged."
            if sent_as_is
            else "were replaced by silence."
        )
    )


def _checked(prepared: Prepared, settings) -> Prepared:
    levels = prepared.levels
    if levels is None:
        return prepared
    if levels.peak_dbfs < settings.silence_dbfs:
        what = "digital silence" if levels.peak == 0 else f"near-silence (peak {levels.peak_dbfs:g} dBFS)"
        raise AudioSilent(
            f"The recording is {what} for its whole length (RELAY_SILENCE_DBFS is {settings.silence_dbfs:g}): "
            "nothing to clone. Check that the microphone was not muted and that the export has sound.",
            **prepared.as_fields(),
        )
    if levels.clipped >= CLIPPING_WARN:
        prepared.warnings.append(
            f"The recording is heavily clipped ({levels.clipped * 100:.1f} % of samples at full scale): "
            "the cloned voice may sound distorted. Record a little further from the microphone."
        )
    if levels.rms_dbfs < LOW_RMS_DBFS:
        prepared.warnings.append(
            f"The recording is very quiet (RMS {levels.rms_dbfs:g} dBFS): the cloned voice may be noisy. "
            "Record closer to the microphone or raise the gain."
        )
    return prepared


def _sniff_path(path: str) -> tuple[str, bytes]:
    head, body = audio.read_start(path)
    return audio.sniff(head, body), head


def source_name(kind: str, head: bytes) -> str:
    """What was received, for ``source_format``: ``opus``, ``webm``, ``mov``, ``3gp``, ``wav``…"""
    if kind == "m4a" and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand == b"qt  ":
            return "mov"
        if brand.startswith(b"3gp"):
            return "3gp"
        if brand.startswith(b"3g2"):
            return "3g2"
        return "m4a" if brand in (b"M4A ", b"M4B ", b"M4P ") else "mp4"
    if kind == "webm":
        return "webm" if b"webm" in head[:64] else "mkv"
    if kind == "aiff":
        return "aifc" if head[8:12] == b"AIFC" else "aiff"
    names = {
        "ogg-opus": "opus",
        "ogg-vorbis": "ogg",
        "ogg-flac": "ogg",
        "adts": "aac",
        "asf": "wma",
        "video": "avi",
        "wav-rf64": "rf64",
        "wavpack": "wv",
    }
    return names.get(kind, kind)


# --- PCM WAV, measured here --------------------------------------------------------------------


def warm_up() -> None:
    """Import what measuring a WAV needs (numpy, ~40 ms), so a process's first clone does not wait for it."""
    import numpy  # noqa: F401


def wav_levels(path: str) -> Levels | None:
    """Levels of a PCM or float WAV, read in blocks into one reused buffer (no FFmpeg; memory
    stays at a few MB whatever the file's size); ``None`` for any other WAV encoding (ADPCM, µ-law…)."""
    layout = _wav_layout(path)
    if layout is None:
        return None
    offset, length, tag, bits, block_align = layout
    meter = _LevelSum.for_format(tag, bits, block_align, length)
    if meter is None:
        return None
    buffer = bytearray(_WAV_BLOCK * meter.width)
    with open(path, "rb") as handle:
        handle.seek(offset)
        left = meter.count * meter.width
        while left > 0:
            got = handle.readinto(memoryview(buffer)[: min(len(buffer), left)])
            if not got:
                break
            got -= got % meter.width
            left -= got
            meter.add(memoryview(buffer)[:got])
    return meter.levels()


class _LevelSum:
    """Peak, sum of squares and clipped samples of PCM or float samples, added block by block."""

    def __init__(self, dtype: str, bits: int, full: float, count: int):
        self.dtype, self.bits, self.full, self.count = dtype, bits, full, count
        self.width = bits // 8
        self.peak = self.total = self.clipped = 0.0
        self._values = None  # reused for the samples as floats (a fresh 1 MB array costs page faults)

    @classmethod
    def for_format(cls, tag: int, bits: int, block_align: int, length: int) -> _LevelSum | None:
        """For ``length`` bytes of samples in this format; None for what is not measured here."""
        width = bits // 8
        if length < block_align or width * 8 != bits:
            return None
        if tag == 3 and bits in (32, 64):
            return cls("<f4" if bits == 32 else "<f8", bits, 1.0, length // width)
        if tag == 1 and bits in (8, 16, 24, 32):
            dtype = {8: "u1", 16: "<i2", 24: "u1", 32: "<i4"}[bits]
            return cls(dtype, bits, float(1 << (bits - 1)), length // width)
        return None

    def add(self, data) -> None:
        """Whole samples (``len(data)`` a multiple of :attr:`width`), in blocks of at most
        ``_WAV_BLOCK`` samples (the float copy stays small and in cache)."""
        step = _WAV_BLOCK * self.width
        for start in range(0, len(data), step):
            self._add(data[start : start + step])

    def _add(self, data) -> None:
        import numpy as np

        raw = np.frombuffer(data, dtype=self.dtype)
        if self.bits == 24:
            triples = raw.reshape(-1, 3).astype(np.int32)
            raw = (triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)) << 8 >> 8  # sign-extend
        elif self.bits == 8:
            raw = raw.astype(np.int16) - 128
        if not raw.size:
            return
        high, low = float(raw.max()), float(raw.min())  # on the samples as they are: no copy
        if not (math.isfinite(high) and math.isfinite(low)):  # a float WAV holding NaN or infinity
            raise AudioCorrupt("The WAV file holds samples that are not numbers (NaN or infinity): it is damaged.")
        top = max(high, -low)
        self.peak = max(self.peak, top)
        # float32 for 8/16-bit samples (each converts exactly; BLAS's fastest dot, whose float32
        # sums differ from an exact one by ~1e-6 — far below the 0.1 dB reported); float64 for wider
        if self._values is None or len(self._values) < raw.size:
            self._values = np.empty(raw.size, np.float32 if self.bits <= 16 else np.float64)
        values = self._values[: raw.size]
        np.copyto(values, raw, casting="unsafe")
        self.total += float(np.dot(values, values))
        if top >= self.full * 0.999:
            self.clipped += float(np.count_nonzero(np.abs(values) >= self.full * 0.999))

    def levels(self) -> Levels:
        full, count = self.full, self.count
        return Levels(min(self.peak / full, 1.0), math.sqrt(self.total / count) / full, self.clipped / count)


class LevelMeter:
    """Measures a PCM WAV while it downloads (:func:`relay.fetch.download`'s ``tap``), from the
    bytes just received, so the file is not read again afterwards. :meth:`levels` gives what
    :func:`wav_levels` would give for the file — or ``None`` when the stream was not one it
    measures (then the file is measured as before)."""

    HEAD_LIMIT = 64 * 1024  # a WAV whose samples start later is measured from the file

    def __init__(self) -> None:
        self.fed = 0
        self._head = bytearray()
        self._failed = False
        self._sum: _LevelSum | None = None
        self._offset = 0  # where the samples start
        self._declared = 0  # the data chunk's length (0: up to the end of the file)
        self._taken = 0  # sample bytes measured so far
        self._carry = b""  # the start of a sample split between two pieces
        self._format = (0, 0, 0)  # format tag, bits per sample, block align

    def feed(self, piece: memoryview) -> None:
        """The next ``piece`` of the file, as written. Never raises: a surprise ends the measuring."""
        if self._failed:
            return
        start = self.fed
        self.fed += len(piece)
        try:
            if self._sum is None:  # still looking for the samples: keep at most HEAD_LIMIT bytes
                room = max(self.HEAD_LIMIT - len(self._head), 0)
                self._head += piece[:room]
                if not self._parse_head():
                    return
                head, self._head = self._head, bytearray()
                self._measure(memoryview(head), 0)
                piece, start = piece[room:], start + room
            if len(piece):
                self._measure(piece, start)
        except Exception:  # noqa: BLE001 - the file is then measured after the download
            self._failed = True

    def _parse_head(self) -> bool:
        """True once the samples' format and start are known (fails the meter if they are not)."""
        head = bytes(self._head)

        def read(offset: int, count: int) -> bytes:
            if offset + count > len(head):
                raise _NotYet
            return head[offset : offset + count]

        try:
            found = _wav_chunks(read)
        except _NotYet:
            self._failed = len(head) >= self.HEAD_LIMIT
            return False
        # The count is settled in levels(), once the file's size is known.
        self._sum = None if found is None else _LevelSum.for_format(*found[2], length=max(found[2][2], 1))
        if found is None or self._sum is None:
            self._failed = True
            return False
        self._offset, self._declared, self._format = found
        return True

    def _measure(self, piece: memoryview, start: int) -> None:
        """Measure the sample bytes of ``piece`` (which starts at file offset ``start``)."""
        assert self._sum is not None
        begin = max(self._offset - start, 0)
        end = len(piece)
        if not audio.unknown_wav_length(self._declared):
            end = min(end, self._offset + self._declared - start)
        if end <= begin:
            return
        data = piece[begin:end]
        width = self._sum.width
        if self._carry:
            need = width - len(self._carry)
            self._carry += bytes(data[:need])
            data = data[need:]
            if len(self._carry) == width:
                self._sum.add(self._carry)
                self._taken += width
                self._carry = b""
        whole = len(data) - len(data) % width
        if whole:
            self._sum.add(data[:whole])
            self._taken += whole
        if whole < len(data):
            self._carry = bytes(data[whole:])

    def levels(self, size: int) -> Levels | None:
        """The file's levels, ``size`` its length in bytes; None when not measured here."""
        meter = self._sum
        if self._failed or meter is None or size != self.fed:
            return None
        length = size - self._offset
        if not audio.unknown_wav_length(self._declared):
            length = min(self._declared, length)
        check = _LevelSum.for_format(*self._format, length) if length > 0 else None
        if check is None or self._taken != check.count * meter.width:
            return None
        meter.count = check.count
        return meter.levels()


def _wav_layout(path: str) -> tuple[int, int, int, int, int] | None:
    """``(data offset, data length, format tag, bits per sample, block align)`` of a WAV."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        found = _wav_chunks(lambda offset, count: os.pread(handle.fileno(), count, offset))
    if found is None:
        return None
    offset, declared, fmt = found
    length = size - offset if audio.unknown_wav_length(declared) else min(declared, size - offset)
    return offset, length, *fmt


class _NotYet(Exception):
    """The bytes asked for have not arrived yet (a WAV followed while it downloads)."""


def _wav_chunks(read: Callable[[int, int], bytes]) -> tuple[int, int, tuple[int, int, int]] | None:
    """Walk a WAV's chunks: ``(data offset, declared data size, (format tag, bits per sample,
    block align))``, or None when it is not a WAV with its ``fmt`` before its ``data``.
    ``read(offset, count)`` gives those bytes (fewer only at the end of the file)."""
    riff = read(0, 12)
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        return None
    position, fmt = 12, None
    while True:
        header = read(position, 8)
        if len(header) < 8:
            return None
        chunk_id, (chunk_size,) = header[:4], struct.unpack("<I", header[4:])
        body = position + 8
        if chunk_id == b"fmt ":
            fields_ = read(body, min(chunk_size, 40))
            if len(fields_) < 16:
                return None
            tag, _channels, _rate, _bps, block_align, bits = struct.unpack("<HHIIHH", fields_[:16])
            if tag == 0xFFFE and len(fields_) >= 26:
                tag = struct.unpack("<H", fields_[24:26])[0]  # the sub-format GUID's first two bytes
            fmt = (tag, bits, block_align)
        elif chunk_id == b"data":
            return None if fmt is None else (body, chunk_size, fmt)
        position = body + chunk_size + (chunk_size & 1)


# --- the child process ---------------------------------------------------------------------------


def _run_child(
    path: str,
    out: str | None,
    demuxer: str,
    settings,
    convert: bool,
    source: str | None = None,
    only_video: bool = False,
) -> dict:
    """Run the decoder child on ``path`` under the configured limits; its JSON result.

    Raises :class:`DecodeLimitExceeded`, :class:`AudioTooLong`, :class:`AudioCorrupt` or
    :class:`NotAudio` for what the child reports, or for how it died."""
    max_seconds = settings.convert_max_seconds
    if settings.max_seconds:
        max_seconds = min(max_seconds, settings.max_seconds)
    job = {
        # Absolute: the child runs in the package's folder, not the caller's (`relay clone voice.ogg`).
        "input": os.path.abspath(path),
        "output": os.path.abspath(out) if convert and out else None,
        "demuxer": demuxer,
        "max_seconds": max_seconds,
        # A file that is only measured (sent as it is) is bounded by RELAY_MAX_SECONDS alone (0: none),
        # not by what conversion allows; the CPU, memory and time limits hold either way.
        "measure_max_seconds": settings.max_seconds,
        "max_bytes": settings.max_bytes,
        "cpu_seconds": settings.convert_cpu_seconds,
        "memory_mb": settings.convert_memory_mb,
        "only_video": only_video,
        "silence_peak": 10 ** (settings.silence_dbfs / 20),
    }
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        # Only what Python needs: no secrets (tokens, database URL) reach the decoder.
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": package_root,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    what = (source or demuxer).upper()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "relay.convert", json.dumps(job)],
            capture_output=True,
            timeout=settings.convert_timeout,
            env=env,
            stdin=subprocess.DEVNULL,
            cwd=package_root,  # `-m` puts the working directory first on sys.path: make it this package's
            start_new_session=True,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DecodeLimitExceeded(
            f"Decoding the {what} file took longer than {settings.convert_timeout:g} s (RELAY_CONVERT_TIMEOUT) "
            "and was stopped. Send a shorter or simpler recording, or convert it to WAV, MP3, FLAC or M4A yourself.",
            audio_bytes=os.path.getsize(path),
        ) from None
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    result = None
    if lines:
        with contextlib.suppress(ValueError):
            result = json.loads(lines[-1])
    size = os.path.getsize(path)
    if done.returncode != 0 or not isinstance(result, dict):
        raise DecodeLimitExceeded(
            f"Decoding the {what} file was stopped: {_death(done.returncode, settings)}. Send a shorter or simpler "
            "recording, or convert it to WAV, MP3, FLAC or M4A yourself.",
            audio_bytes=size,
        )
    if result.get("ok"):
        return result
    problem, detail = result.get("problem"), result.get("message", "")
    if problem == "no_audio":
        raise NotAudio(f"The {what} file has no audio track. Send a recording with sound.", audio_bytes=size)
    if problem == "too_long":
        raise AudioTooLong(
            f"The {what} file decodes to more than {max_seconds:g} s of audio "
            f"({'RELAY_MAX_SECONDS' if max_seconds == settings.max_seconds else 'RELAY_CONVERT_MAX_SECONDS'}). "
            "Trim the recording.",
            audio_bytes=size,
        )
    if problem == "too_large":
        raise DecodeLimitExceeded(
            f"The {what} file converts to more than {settings.max_bytes / 1048576:.1f} MiB (RELAY_MAX_BYTES). "
            "Send a shorter recording.",
            audio_bytes=size,
        )
    if problem == "limit":
        raise DecodeLimitExceeded(
            f"Decoding the {what} file was stopped: {detail}. Send a shorter or simpler recording.", audio_bytes=size
        )
    raise AudioCorrupt(f"The {what} file cannot be decoded ({detail}): it is damaged or truncated.", audio_bytes=size)


def _death(returncode: int, settings) -> str:
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return f"it used more than {settings.convert_cpu_seconds:g} s of CPU time (RELAY_CONVERT_CPU_SECONDS)"
    if returncode == -signal.SIGXFSZ:
        return f"its output grew past {settings.max_bytes / 1048576:.1f} MiB (RELAY_MAX_BYTES)"
    if returncode in (-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS) or returncode > 0:
        limit = settings.convert_memory_mb
        return f"the decoder failed (over RELAY_CONVERT_MEMORY_MB={limit:g}, or damaged data)"
    return f"the decoder ended abnormally ({returncode})"


def _levels_of(result: dict) -> Levels:
    return Levels(result["peak"], result["rms"], result["clipped"])


class _Problem(Exception):
    def __init__(self, problem: str, message: str = ""):
        super().__init__(message)
        self.problem, self.message = problem, message


def _limit_self(job: dict) -> None:
    """Limits the child puts on itself before it loads FFmpeg (inherited by any thread it starts)."""
    import resource

    cpu = max(1, int(math.ceil(job["cpu_seconds"])))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 2))  # SIGXCPU, then SIGKILL
    memory = int(job["memory_mb"] * 1024 * 1024)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # The output may reach max_bytes (plus headers); nothing the child writes may grow past that.
    size = int(job["max_bytes"]) + 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def child_main(argv: list[str]) -> int:
    """Entry point of ``python -m relay.convert '<job JSON>'``: prints one JSON line."""
    # A host stopping the dyno signals every process in it (Heroku: SIGTERM to each): the decode is
    # bounded already (RLIMIT_CPU here, RELAY_CONVERT_TIMEOUT in the parent), so it finishes for the
    # worker, which has its grace period; dying here would fail the clone as "decode_limit_exceeded".
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    job = json.loads(argv[0])
    _limit_self(job)
    try:
        import av  # noqa: F401 - loaded under the limits, so a too small RELAY_CONVERT_MEMORY_MB shows here
        import numpy  # noqa: F401
    except (ImportError, OSError, MemoryError) as err:
        message = f"the decoder could not load within {job['memory_mb']:g} MB ({_short(err)})"
        print(json.dumps({"ok": False, "problem": "limit", "message": message}), flush=True)
        return 0
    try:
        result = _work(job)
    except _Problem as err:
        result = {"ok": False, "problem": err.problem, "message": err.message}
    except MemoryError:
        result = {"ok": False, "problem": "limit", "message": f"it needed more than {job['memory_mb']:g} MB"}
    except Exception as err:  # noqa: BLE001 - hostile input can make any layer raise; the parent logs it
        traceback.print_exc()
        result = {"ok": False, "problem": "corrupt", "message": _short(err)}
    print(json.dumps(result), flush=True)
    return 0


def _work(job: dict) -> dict:
    import av
    import av.logging

    av.logging.set_level(av.logging.PANIC)
    meter = _Meter(job["max_seconds"])
    with open(job["input"], "rb") as source:
        container = _open(source, job["demuxer"])
        streams, track = list(container.streams.audio), 0
        if len(streams) > 1:  # each measured, then the file read again from the start for the one kept
            with container:
                track = _voiced_track(container, streams, job)
            source.seek(0)
            container = _open(source, job["demuxer"])
        with container:
            if not streams:
                raise _Problem("no_audio")
            stream = list(container.streams.audio)[track]
            context = stream.codec_context
            context.thread_count = 1  # CPU time is counted per process: one thread is enough for speech
            # Cover art (an attached picture: iTunes artwork, an MP3's ID3 picture) is not a video.
            still = av.stream.Disposition.attached_pic
            had_video = any(not (video.disposition & still) for video in container.streams.video)
            codec = context.codec.canonical_name
            result = {
                "ok": True,
                "converted": False,
                "had_video": had_video,
                "codec": codec,
                "track": track + 1,
                "tracks": len(streams),
            }
            output = job["output"]
            try:
                if output is None or (job.get("only_video") and not had_video and len(streams) == 1):
                    meter.max_seconds = job.get("measure_max_seconds", meter.max_seconds)
                    for frame in _frames(container, stream, meter):
                        meter.add(frame)
                elif codec in ("aac", "alac", "mp3"):
                    _remux(container, stream, output, "mp3" if codec == "mp3" else "ipod", meter, job["max_bytes"])
                    result.update(converted=True, remuxed=True)
                else:
                    _to_flac(container, stream, output, meter, job["max_bytes"])
                    result.update(converted=True, remuxed=False)
            except av.FFmpegError as err:
                raise _Problem("corrupt", _short(err)) from None
    if meter.count == 0:
        raise _Problem("corrupt", "no audio samples could be decoded")
    return {**result, **meter.levels()}


def _open(source, demuxer: str):
    import av

    try:
        # An open file, a forced demuxer and no protocols: FFmpeg reads these bytes and nothing else.
        return av.open(source, format=demuxer, options={"protocol_whitelist": "none", "enable_drefs": "0"})
    except (av.FFmpegError, ValueError, OSError) as err:
        raise _Problem("corrupt", _short(err)) from None


def _voiced_track(container, streams: list, job: dict) -> int:
    """Which of several audio tracks to clone from (its position among them): the one marked
    default (else the first) unless it is silent, or a hiss 20 dB quieter than another; then the loudest.
    A screen recording's first track may be silent desktop sound, or a microphone's hiss, with the
    voice on the second."""
    import av

    meters = {stream.index: _Meter(job["max_seconds"]) for stream in streams}
    for stream in streams:
        stream.codec_context.thread_count = 1
    try:
        for packet in container.demux(*streams):
            meter = meters[packet.stream.index]
            for frame in _decoded(packet, packet.stream, meter):
                meter.add(frame)
    except av.FFmpegError as err:
        raise _Problem("corrupt", _short(err)) from None
    marked = [n for n, stream in enumerate(streams) if stream.disposition & av.stream.Disposition.default]
    chosen = marked[0] if marked else 0
    loudest = max(range(len(streams)), key=lambda n: meters[streams[n].index].rms())
    kept = meters[streams[chosen].index]
    # The marked track unless it is silent, or only a hiss (its peak under -40 dBFS) 20 dB quieter
    # than another: a microphone's noise floor on one track of a screen recording, the voice on the
    # other. Quiet speech beside loud music peaks far higher, and is kept.
    hiss = kept.peak < _HISS_PEAK and kept.rms() < meters[streams[loudest].index].rms() * _MUCH_QUIETER
    if kept.peak >= job["silence_peak"] and not hiss:
        return chosen
    return loudest


_MUCH_QUIETER = 0.1  # an RMS ratio: 20 dB
_HISS_PEAK = 0.01  # -40 dBFS


def _short(err: BaseException) -> str:
    """FFmpeg's reason in a few words: no file path, no "[Errno 541478725]" code before it."""
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(err).split(": '")[0])
    return text[:160] or type(err).__name__


def _frames(container, stream, meter):
    for packet in container.demux(stream):
        yield from _decoded(packet, stream, meter)


def _decoded(packet, stream, meter):
    """The packet's frames. A packet the decoder refuses (a damaged frame, an AMR comfort-noise
    frame FFmpeg does not decode) becomes silence of its length, as players do, and is counted."""
    import av

    try:
        frames = packet.decode()
    except (av.FFmpegError, ValueError) as err:
        meter.errors += 1
        if meter.errors > 1000 and meter.errors > meter.frames:
            raise _Problem("corrupt", f"most frames cannot be decoded ({_short(err)})") from None
        last = meter.last
        samples = (
            int(round(float(packet.duration * stream.time_base) * last.sample_rate))
            if (last is not None and packet.duration and stream.time_base)
            else 0
        )
        frames = [_silence(last, samples)] if 0 < samples <= last.sample_rate * 10 else []
    for frame in frames:
        meter.last = frame
        meter.frames += 1
        yield frame


def _silence(like, samples: int):
    import av
    import numpy as np

    planar = like.format.is_planar
    channels = like.layout.nb_channels
    shape = (channels, samples) if planar else (1, samples * channels)
    frame = av.AudioFrame.from_ndarray(
        np.zeros(shape, dtype=like.to_ndarray().dtype), format=like.format.name, layout=like.layout.name
    )
    frame.sample_rate = like.sample_rate
    return frame


def _remux(container, stream, output: str, fmt: str, meter, max_bytes: int) -> None:
    import av

    written = 0
    with av.open(output, "w", format=fmt) as out:
        target = out.add_stream_from_template(stream)
        for packet in container.demux(stream):
            for frame in _decoded(packet, stream, meter):
                meter.add(frame)
            if packet.dts is None:  # the demuxer's end-of-stream marker
                continue
            written += packet.size
            if written > max_bytes:
                raise _Problem("too_large")
            packet.stream = target
            out.mux(packet)


def _to_flac(container, stream, output: str, meter, max_bytes: int) -> None:
    import av

    context = stream.codec_context
    deep = (
        bool(context.codec.lossless)
        and (context.bits_per_raw_sample or 0) > 16
        or (
            context.codec.lossless
            and context.format is not None
            and context.format.name in ("flt", "fltp", "dbl", "dblp")
        )
    )
    sample_format = "s32" if deep else "s16"
    written = 0
    with av.open(output, "w", format="flac") as out:
        target = None
        resampler = None
        for frame in _frames(container, stream, meter):
            meter.add(frame)
            if target is None:
                channels = frame.layout.nb_channels
                layout = frame.layout.name if channels <= 8 else "stereo"
                if channels > 8:  # FLAC holds at most 8
                    meter.mixed_from = channels
                target = out.add_stream("flac", rate=frame.sample_rate, layout=layout, format=sample_format)
                if deep:
                    target.codec_context.bits_per_raw_sample = 24
                resampler = av.AudioResampler(format=sample_format, layout=layout, rate=frame.sample_rate)
            frame.pts = None
            try:
                converted = resampler.resample(frame)
            except ValueError as err:  # the stream changed its rate or layout half way
                raise _Problem("corrupt", f"the audio changes format mid-stream ({err})") from None
            for piece in converted:
                for packet in target.encode(piece):
                    written += packet.size
                    if written > max_bytes:
                        raise _Problem("too_large")
                    out.mux(packet)
        if target is None:
            raise _Problem("corrupt", "no audio samples could be decoded")
        for piece in resampler.resample(None):
            for packet in target.encode(piece):
                out.mux(packet)
        for packet in target.encode(None):
            out.mux(packet)


class _Meter:
    """Accumulates peak, energy and clipping over decoded frames; stops at ``max_seconds``."""

    def __init__(self, max_seconds: float):
        self.max_seconds = max_seconds
        self.peak = self.total = self.clipped = 0.0
        self.count = 0
        self.seconds = 0.0
        self.errors = self.frames = 0  # packets replaced by silence; frames decoded
        self.last = None
        self.mixed_from: int | None = None  # channels mixed down to stereo, if any

    def add(self, frame) -> None:
        import numpy as np

        self.seconds += frame.samples / (frame.sample_rate or 1)
        if self.max_seconds and self.seconds > self.max_seconds:
            raise _Problem("too_long")
        data = frame.to_ndarray().reshape(-1)
        name = frame.format.name.rstrip("p")
        if name == "u8":
            data = data.astype(np.float32) - 128.0
            full = 128.0
        elif name in ("s16", "s32", "s64"):
            full = float(1 << (int(name[1:]) - 1))
        else:
            full = 1.0
        if data.size == 0:
            return
        values = data.astype(np.float64) / full
        top = float(np.max(np.abs(values)))
        if not math.isfinite(top):
            raise _Problem("corrupt", "the decoder produced invalid samples")
        self.peak = max(self.peak, top)
        self.total += float(np.dot(values, values))
        if top >= 0.999:
            self.clipped += float(np.count_nonzero(np.abs(values) >= 0.999))
        self.count += values.size

    def rms(self) -> float:
        return math.sqrt(self.total / max(self.count, 1))

    def levels(self) -> dict:
        return {
            "peak": min(self.peak, 1.0),
            "rms": self.rms(),
            "clipped": self.clipped / max(self.count, 1),
            "seconds": round(self.seconds, 3),
            "decode_errors": self.errors,
            "frames": self.frames,
            "channels": self.last.layout.nb_channels if self.last is not None else None,
            "mixed_from": self.mixed_from,
        }


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
