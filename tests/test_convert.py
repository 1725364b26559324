"""Conversion and level analysis, on recordings made by real encoders (tests/fixtures/make_media.sh).

Every check of an output decodes it with PyAV (a dependency of the relay), so no encoder is needed
at test time.
"""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import threading
import time
from pathlib import Path

import av
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from relay import convert
from relay.errors import RelayError
from relay.settings import Settings

from .conftest import AUDIO

MEDIA = AUDIO.parent / "media"
SETTINGS = Settings()

CONVERTED = [
    # file, source_format, sent format, remuxed (no re-encode)
    ("voice_note.opus", "opus", "flac", False),
    ("voice.ogg", "ogg", "flac", False),
    ("ogg_flac.oga", "ogg", "flac", False),
    ("browser.webm", "webm", "flac", False),
    ("raw.aac", "aac", "m4a", True),
    ("studio.aiff", "aiff", "flac", False),
    ("studio24.aif", "aiff", "flac", False),
    ("studio_float.aifc", "aifc", "flac", False),
    ("android.amr", "amr", "flac", False),
    ("android.3gp", "3gp", "flac", False),
    ("phone.3g2", "3g2", "m4a", True),
    ("memo.caf", "caf", "m4a", True),
    ("voice.wma", "wma", "flac", False),
    ("phone.mp4", "mp4", "m4a", True),
    ("iphone.mov", "mov", "m4a", True),
    ("zoom.mkv", "mkv", "flac", False),
    ("loom.webm", "webm", "flac", False),
    ("old.avi", "avi", "mp3", True),
    # Accepted containers holding what useapi may not read: converted, not sent as they are
    ("fragmented.m4a", "mp4", "m4a", True),  # MediaRecorder's audio/mp4: its length is in fragments
    ("dictaphone_ima.wav", "wav", "flac", False),  # IMA ADPCM
    ("mp3_in.wav", "wav", "mp3", True),
    ("mp3_in.mp4", "mp4", "mp3", True),
    # A silent first track and the voice on the second: the voice is kept
    ("two_tracks.m4a", "m4a", "m4a", True),
    ("two_tracks.mkv", "mkv", "flac", False),
]
PYAV_FORMAT = {"flac": "flac", "m4a": "mov,mp4,m4a,3gp,3g2,mj2", "mp3": "mp3"}
ACCEPTED = [
    "wav_pcm16_mono.wav",
    "wav_pcm24_stereo.wav",
    "mp3_vbr_id3v2.mp3",
    "flac_mono.flac",
    "m4a_aac.m4a",
    "m4a_alac.m4a",
    "mp4_isom_aac.mp4",
]


def decoded(path, sent: bool = True) -> tuple[float, str]:
    """Seconds of audio in ``path`` counted sample by sample, and its container's format name."""
    with av.open(str(path)) as container:
        assert not (sent and container.streams.video), "a video stream was sent"
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        samples = 0
        for packet in container.demux(stream):
            try:
                samples += sum(frame.samples for frame in packet.decode())
            except av.FFmpegError:  # AMR comfort-noise frames: FFmpeg does not decode them; count their length
                samples += round(float(packet.duration * stream.time_base) * rate)
        return samples / rate, container.format.name


@pytest.fixture
def prepared(tmp_path):
    made = []

    def run(name, settings=SETTINGS, mode="auto", folder=MEDIA):
        result = convert.prepare(str(folder / name), settings, mode, workdir=str(tmp_path))
        made.append(result)
        return result

    yield run
    for result in made:
        if result.converted and os.path.exists(result.path):
            os.unlink(result.path)


@pytest.mark.parametrize(("name", "source", "target", "remuxed"), CONVERTED)
def test_every_listed_format_converts_to_the_same_duration_with_no_video(prepared, name, source, target, remuxed):
    result = prepared(name)
    assert (result.converted, result.source_format, result.info.format) == (True, source, target)
    seconds, container_format = decoded(result.path)
    original, _ = decoded(MEDIA / name, sent=False)
    assert container_format == PYAV_FORMAT[target]
    assert seconds == pytest.approx(original, rel=0.02)
    with av.open(result.path) as out, av.open(str(MEDIA / name)) as src:
        assert out.streams.audio[0].codec_context.sample_rate == src.streams.audio[0].codec_context.sample_rate
        assert out.streams.audio[0].codec_context.channels == src.streams.audio[0].codec_context.channels
        if remuxed:  # no re-encode: the same codec went through
            assert out.streams.audio[0].codec_context.name == src.streams.audio[0].codec_context.name
    fields = result.as_fields()
    assert fields["audio_content_type"] in {"audio/flac", "audio/mp4", "audio/mpeg"}
    assert fields["audio_peak_dbfs"] > -3 and -30 < fields["audio_rms_dbfs"] < -15
    assert any("before upload" in warning for warning in result.warnings)


@pytest.mark.parametrize("name", ["two_tracks.m4a", "two_tracks.mkv"])
def test_of_several_audio_tracks_the_voice_is_sent_alone_and_the_answer_says_which(prepared, name):
    # two_tracks.m4a marks its second track default, two_tracks.mkv marks none: the first is silent in both.
    result = prepared(name)
    with av.open(result.path) as out:
        assert len(out.streams.audio) == 1
    assert result.levels.peak_dbfs > -3
    assert any("audio track 2 of 2 kept" in warning for warning in result.warnings)


def _two_track_mkv(path, first_amplitude: float, second_amplitude: float, first_bursts: bool = False) -> None:
    """A Matroska file with two FLAC audio tracks of 3 s at 16 kHz, none marked default (so the first
    counts as it): a noise floor and a tone, made with PyAV (ffmpeg's libraries)."""
    import numpy

    rate, seconds = 16000, 3
    rng = numpy.random.default_rng(7)
    tone = numpy.sin(2 * numpy.pi * 220 * numpy.arange(rate * seconds) / rate)
    samples = {
        0: rng.normal(0, first_amplitude, rate * seconds),
        1: second_amplitude * tone,
    }
    if first_bursts:  # speech-like: loud syllables 5 % of the time, quiet between them
        samples[0] = first_amplitude * tone * (numpy.arange(rate * seconds) % rate < rate // 20)
    with av.open(str(path), "w", format="matroska") as out:
        streams = [out.add_stream("flac", rate=rate, layout="mono") for _ in range(2)]
        pcm = {n: (numpy.clip(samples[n], -1, 1) * 32767).astype(numpy.int16) for n in samples}
        for start in range(0, rate * seconds, 1024):
            for n, stream in enumerate(streams):
                frame = av.AudioFrame.from_ndarray(
                    pcm[n][start : start + 1024].reshape(1, -1), format="s16", layout="mono"
                )
                frame.sample_rate, frame.pts = rate, start
                out.mux(stream.encode(frame))
        for stream in streams:
            out.mux(stream.encode(None))


def test_a_cut_m4a_whose_audio_runs_to_the_end_is_truncated_not_its_header_length(prepared, tmp_path):
    """An M4A with its index first, cut short, its audio box's size 0 ("to the end of the file"): the
    header's 2 s was answered ready while useapi got 0.5 s (in review: 11.3 s claimed, 5.6 s sent)."""
    whole = tmp_path / "faststart.m4a"
    with av.open(str(AUDIO / "m4a_aac.m4a")) as source:
        stream = source.streams.audio[0]
        with av.open(str(whole), "w", format="ipod", options={"movflags": "faststart"}) as out:
            copy = out.add_stream_from_template(stream)
            for packet in source.demux(stream):
                if packet.dts is not None:
                    packet.stream = copy
                    out.mux(packet)
    data = bytearray(whole.read_bytes())
    mdat = data.index(b"mdat") - 4
    assert data.index(b"moov") < mdat  # the index first, the audio last
    cut = data[: mdat + 8 + (len(data) - mdat - 8) // 4]
    cut[mdat : mdat + 4] = (0).to_bytes(4, "big")  # "to the end of the file"
    (tmp_path / "cut.m4a").write_bytes(bytes(cut))
    with pytest.raises(RelayError) as caught:
        prepared("cut.m4a", folder=tmp_path)
    assert caught.value.error_code == "audio_corrupt" and "M4A file is truncated" in caught.value.message
    assert caught.value.fields["audio_duration_seconds"] < 1  # what is there, not what the header claims


def test_a_default_track_of_hiss_gives_way_to_the_voice_track(prepared, tmp_path):
    """An OBS-style recording: track 1 (the default one) holds a microphone's hiss at about -50 dBFS,
    track 2 the voice. Before, the hiss was cloned (it is not silent) and the voice dropped."""
    _two_track_mkv(tmp_path / "obs.mkv", first_amplitude=0.0015, second_amplitude=0.5)  # hiss peaks near -44 dBFS
    result = prepared("obs.mkv", folder=tmp_path)
    assert any("audio track 2 of 2 kept" in warning for warning in result.warnings), result.warnings
    assert result.levels.peak_dbfs > -10


def test_quiet_speech_on_the_default_track_is_kept_beside_loud_music(prepared, tmp_path):
    """Speech peaking at -12 dBFS but 20 dB under loud music in RMS (syllables between pauses): the
    voice, not the music, is cloned."""
    _two_track_mkv(tmp_path / "talk.mkv", first_amplitude=0.25, second_amplitude=0.9, first_bursts=True)
    result = prepared("talk.mkv", folder=tmp_path)
    assert any("audio track 1 of 2 kept" in warning for warning in result.warnings), result.warnings


def test_a_default_track_near_the_loudest_is_kept(prepared, tmp_path):
    _two_track_mkv(tmp_path / "close.mkv", first_amplitude=0.2, second_amplitude=0.5)  # within 20 dB
    result = prepared("close.mkv", folder=tmp_path)
    assert any("audio track 1 of 2 kept" in warning for warning in result.warnings), result.warnings


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("fragmented.m4a", "fragmented"),
        ("dictaphone_ima.wav", "IMA ADPCM"),
        ("mp3_in.wav", "MP3"),
        ("mp3_in.mp4", "MP3, which useapi.net does not accept in an MP4"),
    ],
)
def test_with_conversion_off_what_useapi_may_not_read_is_refused_not_sent(prepared, name, says):
    with pytest.raises(RelayError) as caught:
        prepared(name, SETTINGS, "never")
    assert caught.value.error_code == "unsupported_audio_format"
    assert says in caught.value.message and "Convert it to" in caught.value.message


def _damaged_m4a(tmp_path, share: float):
    """m4a_aac.m4a with ``share`` of its audio data zeroed, from a quarter of the way in."""
    data = bytearray((AUDIO / "m4a_aac.m4a").read_bytes())
    at = data.find(b"mdat")
    size = struct.unpack(">I", data[at - 4 : at])[0]
    start, count = at + 4 + size // 4, int(size * share)
    data[start : start + count] = bytes(count)
    path = tmp_path / f"damaged-{share}.m4a"
    path.write_bytes(bytes(data))
    return path


def test_a_few_damaged_frames_in_a_file_sent_as_it_is_are_a_warning(prepared, tmp_path):
    result = prepared(_damaged_m4a(tmp_path, 0.05).name, folder=tmp_path)
    assert result.converted is False
    assert any("damaged or undecodable frames were left as they are" in warning for warning in result.warnings)


def test_a_file_mostly_damaged_is_refused_before_any_upload(prepared, tmp_path):
    with pytest.raises(RelayError) as caught:
        prepared(_damaged_m4a(tmp_path, 0.45).name, folder=tmp_path)
    assert caught.value.error_code == "audio_corrupt"
    assert "audio frames cannot be decoded" in caught.value.message
    assert caught.value.fields["audio_format"] == "m4a"


def test_a_mono_m4a_is_reported_mono_whatever_its_track_header_says(prepared):
    # MP4 muxers write 2 channels in the track header of a mono AAC stream; mutagen reads that.
    result = prepared("m4a_aac.m4a", folder=AUDIO)
    assert (result.converted, result.info.channels, result.as_fields()["audio_channels"]) == (False, 1, 1)


def test_a_24_bit_studio_file_stays_24_bit(prepared):
    result = prepared("studio24.aif")
    with av.open(result.path) as out:
        assert out.streams.audio[0].codec_context.format.name == "s32"  # FLAC's 24-bit samples


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_audio_is_sent_byte_for_byte_and_measured(prepared, name):
    before = hashlib.sha256((AUDIO / name).read_bytes()).hexdigest()
    result = prepared(name, folder=AUDIO)
    assert result.converted is False
    assert result.path == str(AUDIO / name)
    assert hashlib.sha256((AUDIO / name).read_bytes()).hexdigest() == before
    assert result.source_format in {"wav", "mp3", "flac", "m4a", "mp4"}
    assert result.as_fields()["audio_peak_dbfs"] < 0


@pytest.mark.parametrize("name", ["silence.wav", "near_silence.wav", "silence.opus"])
def test_silence_and_near_silence_are_refused(prepared, name):
    with pytest.raises(RelayError) as caught:
        prepared(name)
    assert caught.value.error_code == "audio_silent"
    assert caught.value.http_status == 422
    assert caught.value.fields["audio_peak_dbfs"] < -60


def test_digital_silence_reports_the_floor():
    with pytest.raises(RelayError) as caught:
        convert.prepare(str(MEDIA / "silence.wav"), SETTINGS)
    assert caught.value.fields["audio_peak_dbfs"] == convert.FLOOR_DBFS
    assert "digital silence" in caught.value.message


def test_a_wav_that_is_not_pcm_is_measured_by_the_decoder_and_sent_as_it_is(prepared):
    assert convert.wav_levels(str(MEDIA / "mulaw.wav")) is None  # not plain PCM: not measured in-process
    result = prepared("mulaw.wav")
    assert (result.converted, result.info.format, result.path) == (False, "wav", str(MEDIA / "mulaw.wav"))
    assert -3 < result.levels.peak_dbfs < 0


def test_the_silence_threshold_is_a_setting(prepared):
    result = prepared("near_silence.wav", SETTINGS.replace(silence_dbfs=-80))
    assert result.converted is False


def test_quiet_and_clipped_recordings_pass_with_a_warning(prepared):
    assert any("very quiet" in w for w in prepared("quiet.wav").warnings)
    assert any("clipped" in w for w in prepared("clipped.wav").warnings)
    assert prepared("speech.wav").warnings == []


@pytest.mark.parametrize(
    ("mode", "settings"), [("never", SETTINGS), ("auto", SETTINGS.replace(convert="off"))], ids=["request", "relay"]
)
def test_conversion_can_be_turned_off(prepared, mode, settings):
    with pytest.raises(RelayError) as caught:
        prepared("voice_note.opus", settings, mode)
    assert caught.value.error_code == "unsupported_audio_format"
    # A video, or an MP4 of several audio tracks, would reach useapi.net whole, and it may take the
    # first track (a screen recording's silent desktop sound): refused, as the README says.
    for name, says in (("phone.mp4", "has a video track"), ("two_tracks.m4a", "has 2 audio tracks")):
        with pytest.raises(RelayError) as caught:
            prepared(name, settings, mode)
        assert caught.value.error_code == "unsupported_audio_format" and says in caught.value.message
        assert "convert=auto" in caught.value.message
    # Cover art is no video: an M4A with artwork goes as it is.
    assert prepared("cover_art.m4a", settings, mode).converted is False


def test_cover_art_is_no_video_track_an_m4a_with_artwork_goes_byte_for_byte(prepared):
    result = prepared("cover_art.m4a")
    assert (result.converted, result.warnings) == (False, [])


def test_a_file_sent_as_it_is_is_not_bound_by_the_conversion_limit(prepared):
    # RELAY_CONVERT_MAX_SECONDS bounds what a conversion writes; a file only measured (an MP3, an
    # A-law WAV) is bound by RELAY_MAX_SECONDS alone (a 2-hour MP3 sent unchanged was refused).
    short = SETTINGS.replace(convert_max_seconds=1)
    assert prepared("mp3_cbr_bare.mp3", short, folder=AUDIO).converted is False
    assert prepared("mulaw.wav", short).converted is False
    with pytest.raises(RelayError) as caught:  # a conversion still is
        prepared("voice_note.opus", short)
    assert caught.value.error_code == "audio_too_long"
    with pytest.raises(RelayError) as caught:  # and RELAY_MAX_SECONDS bounds both, with what was learned
        prepared("mulaw.wav", SETTINGS.replace(max_seconds=1.0, min_seconds=0.5))
    assert caught.value.error_code == "audio_too_long" and caught.value.fields["audio_duration_seconds"]


def test_a_flac_written_to_a_pipe_is_rewritten_with_its_length(prepared):
    # ffmpeg -f flac - | …: no total length in its header ("no samples" before).
    result = prepared("piped.flac")
    assert (result.converted, result.info.format) == (True, "flac")
    assert result.info.duration_seconds == pytest.approx(1.573, abs=0.01)
    with pytest.raises(RelayError) as caught:
        prepared("piped.flac", SETTINGS, "never")
    assert caught.value.error_code == "unsupported_audio_format" and "written to a pipe" in caught.value.message


def test_a_mixdown_of_more_channels_than_flac_holds_is_said(prepared):
    result = prepared("ten_channels.aiff")
    assert (result.converted, result.info.channels) == (True, 2)
    assert "its 10 channels mixed to stereo" in result.warnings[0]


def test_a_flac_cut_short_is_audio_corrupt_not_sent_with_its_headers_length(prepared):
    # An interrupted download: the header says 6.3 s, 1.7 s is there (it went to useapi as 6.3 s).
    with pytest.raises(RelayError) as caught:
        prepared("flac_cut.flac")
    assert caught.value.error_code == "audio_corrupt"
    assert "header says 6.3 s, and only 1.7 s" in caught.value.message


def test_unknown_bytes_never_reach_the_decoder(prepared):
    for name in ("random.bin", "drive_interstitial.html", "empty.bin"):
        with pytest.raises(RelayError) as caught:
            prepared(name, folder=AUDIO)
        assert caught.value.error_code == "not_audio"


def test_a_playlist_is_text_not_a_reference_to_follow(prepared, tmp_path, audio_host):
    audio_host.expect_request("/voice.opus").respond_with_data((MEDIA / "voice_note.opus").read_bytes())
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXTINF:2,\n{audio_host.url_for('/voice.opus')}\n")
    with pytest.raises(RelayError) as caught:
        convert.prepare(str(playlist), SETTINGS)
    assert caught.value.error_code == "not_audio"
    assert audio_host.log == []


def test_even_a_playlist_demuxer_in_the_child_opens_no_url(tmp_path, audio_host):
    # The relay never picks the HLS demuxer; forced here, the child still reaches nothing: it gets an
    # open file and an empty protocol whitelist, so the playlist's segment is never requested.
    audio_host.expect_request("/seg.aac").respond_with_data((MEDIA / "raw.aac").read_bytes())
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2,\n{audio_host.url_for('/seg.aac')}\n#EXT-X-ENDLIST\n"
    )
    with pytest.raises(RelayError) as caught:
        convert._run_child(str(playlist), None, "hls", SETTINGS, convert=False)
    assert caught.value.error_code == "audio_corrupt"
    assert audio_host.log == []
    # The control: the same playlist, opened with network protocols allowed, does fetch the segment.
    with av.open(str(playlist), format="hls", options={"protocol_whitelist": "file,http,tcp"}) as opened:
        assert opened.streams.audio
    assert len(audio_host.log) == 1


def test_truncated_files_fail_cleanly(prepared):
    for name in ("truncated.opus", "truncated.webm"):
        with pytest.raises(RelayError) as caught:
            prepared(name)
        assert caught.value.error_code in {"audio_corrupt", "audio_too_short"}
        assert "Errno" not in caught.value.message  # FFmpeg's reason, not its error number


def test_output_duration_is_bounded(prepared):
    with pytest.raises(RelayError) as caught:
        prepared("voice_note.opus", SETTINGS.replace(convert_max_seconds=1))
    assert caught.value.error_code == "audio_too_long"


def test_output_size_is_bounded(prepared):
    with pytest.raises(RelayError) as caught:
        prepared("studio.aiff", SETTINGS.replace(max_bytes=20_000))
    assert caught.value.error_code == "decode_limit_exceeded"
    assert "RELAY_MAX_BYTES" in caught.value.message


def test_cpu_time_is_bounded(prepared, tmp_path):
    # An hour of MP3 (the same frames 1,800 times) takes more than a second of CPU to decode.
    frames = (AUDIO / "mp3_cbr_bare.mp3").read_bytes()
    (tmp_path / "long.mp3").write_bytes(frames * 1800)
    with pytest.raises(RelayError) as caught:
        prepared("long.mp3", SETTINGS.replace(convert_cpu_seconds=1), folder=tmp_path)
    assert caught.value.error_code == "decode_limit_exceeded"
    assert "CPU" in caught.value.message


def test_memory_is_bounded():
    # The limit is the child's address space: 100 MB is too little even to load FFmpeg.
    with pytest.raises(RelayError) as caught:
        convert.prepare(str(MEDIA / "voice_note.opus"), SETTINGS.replace(convert_memory_mb=100))
    assert caught.value.error_code == "decode_limit_exceeded"
    assert "100 MB" in caught.value.message


def test_a_decoder_that_hangs_is_stopped_by_the_wall_clock(tmp_path):
    fifo = tmp_path / "never.opus"
    os.mkfifo(fifo)  # the child blocks opening it: nobody ever writes
    with pytest.raises(RelayError) as caught:
        convert._run_child(str(fifo), None, "ogg", SETTINGS.replace(convert_timeout=2), convert=False)
    assert caught.value.error_code == "decode_limit_exceeded"
    assert "RELAY_CONVERT_TIMEOUT" in caught.value.message


def _child_of(marker: str) -> int:
    """The pid of the decoder child whose command line holds ``marker``, once it ignores SIGTERM."""
    for _ in range(400):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            ignored = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
            if b"relay.convert" in cmdline and marker.encode() in cmdline and ignored & (1 << (signal.SIGTERM - 1)):
                return int(pid)
        time.sleep(0.05)
    raise AssertionError("no decoder child ignoring SIGTERM")


def test_a_host_stopping_every_process_lets_the_decode_finish(tmp_path):
    # Heroku stops a dyno with SIGTERM to each of its processes: the decoder child must not die of it
    # (the clone failed "decode_limit_exceeded"); its worker has the grace period to finish the step.
    fifo = tmp_path / "arriving.opus"
    os.mkfifo(fifo)  # the child waits on it, after it started: the signal comes mid-job
    outcome: dict = {}

    def decode() -> None:
        try:
            outcome["result"] = convert._run_child(str(fifo), None, "ogg", SETTINGS.replace(convert_timeout=30), False)
        except RelayError as err:
            outcome["error"] = err

    worker = threading.Thread(target=decode)
    worker.start()
    os.kill(_child_of(str(fifo)), signal.SIGTERM)
    with open(fifo, "wb") as feed:
        feed.write((AUDIO / "opus.opus").read_bytes())
    worker.join(30)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"]["ok"] and outcome["result"]["seconds"] > 0


SEEDS = ["voice_note.opus", "browser.webm", "phone.mp4", "raw.aac", "voice.wma", "studio.aiff", "android.amr"]


@hyp_settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(64, 4096)),
)
def test_mutated_headers_never_crash_or_hang(tmp_path, seed, edits, cut):
    data = bytearray((MEDIA / seed).read_bytes())
    for offset, value in edits:
        if offset < len(data):
            data[offset] = value
    if cut is not None:
        data = data[:cut]
    path = tmp_path / f"mutated-{seed}"
    path.write_bytes(bytes(data))
    limited = SETTINGS.replace(convert_timeout=20, convert_cpu_seconds=10)
    try:
        result = convert.prepare(str(path), limited, workdir=str(tmp_path))
    except RelayError as err:
        assert err.error_code != "internal_error", err.message
        return
    if result.converted:
        decoded(result.path)  # whatever was made decodes
        os.unlink(result.path)


def test_analysis_of_a_large_wav_is_cheap(tmp_path):
    import time

    import numpy as np

    # 40 MB of 16-bit stereo at 44.1 kHz, about four minutes.
    rng = np.random.default_rng(3)
    samples = (rng.standard_normal(10_000_000 * 2) * 3000).astype("<i2")
    header = convert_wav_header(len(samples) * 2, channels=2, rate=44100, bits=16)
    path = tmp_path / "big.wav"
    path.write_bytes(header + samples.tobytes())
    started = time.process_time()
    levels = convert.wav_levels(str(path))
    assert levels is not None and -25 < levels.rms_dbfs < -15
    # No timing assertion beyond a generous bound: the point is that it does not decode.
    assert time.process_time() - started < 5


def convert_wav_header(data_bytes: int, channels: int, rate: int, bits: int) -> bytes:
    import struct

    block = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, bits)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def _pcm_wav(path, codec: str, layout: str = "mono", metadata: dict | None = None) -> str:
    """A WAV written by FFmpeg's muxer (through PyAV) in ``codec``: half a second of a loud sine."""
    import numpy as np

    with av.open(str(path), "w", format="wav") as out:
        if metadata:
            out.metadata.update(metadata)
        stream = out.add_stream(codec, rate=16000, layout=layout)
        t = np.arange(8000) / 16000
        tone = (0.999 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        channels = len(stream.layout.channels)
        frame = av.AudioFrame.from_ndarray(np.tile(tone, (channels, 1)), format="fltp", layout=layout)
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return str(path)


def _metered(path: str, pieces: list[int]) -> convert.Levels | None:
    """What the download's level meter says of ``path`` fed in pieces of these sizes (cycled)."""
    with open(path, "rb") as handle:
        data = memoryview(handle.read())
    meter = convert.LevelMeter()
    position, n = 0, 0
    while position < len(data):
        size = pieces[n % len(pieces)]
        meter.feed(data[position : position + size])
        position, n = position + size, n + 1
    return meter.levels(len(data))


@pytest.mark.parametrize("pieces", [[1], [3, 1, 7], [4097, 2, 65536], [1 << 20]])
def test_a_wav_measured_while_it_downloads_gets_the_levels_of_the_file(tmp_path, pieces):
    files = [str(AUDIO / name) for name in ("wav_pcm16_mono.wav", "wav_pcm24_stereo.wav", "wav_truncated.wav")]
    files += [str(MEDIA / name) for name in ("clipped.wav", "quiet.wav", "near_silence.wav")]
    files += [
        _pcm_wav(tmp_path / f"{codec}.wav", codec)
        for codec in ("pcm_u8", "pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_f32le", "pcm_f64le")
    ]
    # Chunks before the samples (LIST INFO), and the extensible format of a multichannel file.
    files.append(_pcm_wav(tmp_path / "tagged.wav", "pcm_s16le", metadata={"title": "x" * 3000}))
    files.append(_pcm_wav(tmp_path / "surround.wav", "pcm_s24le", layout="5.1"))
    for path in files:
        expected = convert.wav_levels(path)
        got = _metered(path, pieces)
        assert expected is not None and got is not None, path
        assert (got.peak, got.clipped) == (expected.peak, expected.clipped), path
        assert got.rms == pytest.approx(expected.rms, rel=1e-6), path
        assert (got.peak_dbfs, got.rms_dbfs) == (expected.peak_dbfs, expected.rms_dbfs), path


def test_the_level_meter_leaves_what_it_does_not_measure_to_the_file(tmp_path):
    # Not plain PCM (µ-law), not a WAV, samples past its look-ahead, or not the whole file.
    assert _metered(str(MEDIA / "mulaw.wav"), [1000]) is None
    assert _metered(str(AUDIO / "flac_mono.flac"), [1000]) is None
    far = _pcm_wav(tmp_path / "far.wav", "pcm_s16le", metadata={"comment": "y" * 70_000})
    assert _metered(far, [4096]) is None and convert.wav_levels(far) is not None
    path = str(AUDIO / "wav_pcm16_mono.wav")
    meter = convert.LevelMeter()
    with open(path, "rb") as handle:
        data = handle.read()
    meter.feed(memoryview(data)[:-10])
    assert meter.levels(len(data)) is None  # it saw less than the file has


def test_a_float_wav_holding_nan_is_refused_as_damaged_however_it_arrived(tmp_path):
    import struct

    import numpy as np

    samples = np.full(16000, 0.25, dtype="<f4")
    samples[0] = np.nan  # one sample that is not a number, where a block starts or not
    body = samples.tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    data = b"RIFF" + struct.pack("<I", 4 + 24 + 8 + len(body)) + b"WAVE"
    data += b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(body)) + body
    path = tmp_path / "nan.wav"
    path.write_bytes(data)
    for pieces in ([1], [46, 3], [4096], [1 << 20]):
        assert _metered(str(path), pieces) is None  # the meter leaves it to the file...
    with pytest.raises(RelayError) as refused:  # ...which is refused, whatever the pieces were
        convert.prepare(str(path), SETTINGS, workdir=str(tmp_path))
    assert refused.value.error_code == "audio_corrupt"
