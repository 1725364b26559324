"""Format detection, structural checks and measurements, on files made by real encoders."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import audio
from relay.errors import RelayError

from .conftest import AUDIO

ACCEPTED = [
    # file, format, content type, duration, sample rate, channels
    ("wav_pcm16_mono.wav", "wav", "audio/wav", 2.0, 16000, 1),
    ("wav_pcm24_stereo.wav", "wav", "audio/wav", 1.5, 16000, 2),
    ("mp3_cbr_bare.mp3", "mp3", "audio/mpeg", 2.06, 22050, 1),
    ("mp3_cbr_id3v1.mp3", "mp3", "audio/mpeg", 2.06, 22050, 1),
    ("mp3_vbr_id3v2.mp3", "mp3", "audio/mpeg", 2.06, 22050, 1),
    ("mp3_vbr_noxing.mp3", "mp3", "audio/mpeg", 2.06, 22050, 1),
    ("flac_mono.flac", "flac", "audio/flac", 2.0, 16000, 1),
    ("m4a_aac.m4a", "m4a", "audio/mp4", 2.05, 22050, 2),
    ("m4a_alac.m4a", "m4a", "audio/mp4", 2.0, 16000, 1),
    ("mp4_isom_aac.mp4", "m4a", "audio/mp4", 2.05, 22050, 2),
    ("mp4_mp42_aac.mp4", "m4a", "audio/mp4", 2.05, 22050, 2),
]

REFUSED = [
    ("empty.bin", "not_audio", "empty"),
    ("random.bin", "not_audio", "no audio format"),
    ("drive_interstitial.html", "not_audio", "Virus scan warning"),
    ("drive_interstitial.html", "not_audio", "as a file: attach the recording itself"),  # links and uploads alike
    ("mp4_video_only.mp4", "not_audio", "no audio track"),
    ("ogg_vorbis.ogg", "unsupported_audio_format", "Ogg Vorbis"),
    ("opus.opus", "unsupported_audio_format", "Ogg Opus"),
    ("adts.aac", "unsupported_audio_format", "raw AAC"),
    ("aiff.aiff", "unsupported_audio_format", "AIFF"),
    ("wav_truncated.wav", "audio_corrupt", "truncated"),
    ("m4a_truncated.m4a", "audio_corrupt", "truncated"),
    ("flac_truncated.flac", "audio_corrupt", "FLAC"),
    ("wav_short.wav", "audio_too_short", "0.30 s"),
]


@pytest.mark.parametrize(("name", "fmt", "content_type", "seconds", "rate", "channels"), ACCEPTED)
def test_accepted_files_are_identified_and_measured(name, fmt, content_type, seconds, rate, channels):
    info = audio.probe(str(AUDIO / name), min_seconds=1)
    assert (info.format, info.content_type, info.sample_rate, info.channels) == (fmt, content_type, rate, channels)
    assert info.duration_seconds == pytest.approx(seconds, abs=0.06)
    assert info.size == (AUDIO / name).stat().st_size


@pytest.mark.parametrize(("name", "code", "says"), REFUSED)
def test_refused_files_name_what_was_found(name, code, says):
    with pytest.raises(RelayError) as caught:
        audio.probe(str(AUDIO / name), min_seconds=1)
    assert caught.value.error_code == code
    assert says in caught.value.message


def test_vbr_mp3_without_xing_header_gets_its_real_duration():
    # mutagen estimates this file at about 0.19 s from its first frame's bitrate.
    info = audio.probe(str(AUDIO / "mp3_vbr_noxing.mp3"), min_seconds=1)
    assert info.duration_seconds > 2.0


def test_max_seconds_bounds_the_duration():
    with pytest.raises(RelayError) as caught:
        audio.probe(str(AUDIO / "wav_pcm16_mono.wav"), min_seconds=1, max_seconds=1.5)
    assert caught.value.error_code == "audio_too_long"
    assert caught.value.fields["audio_format"] == "wav"


def test_a_refusal_after_measuring_keeps_the_measurements():
    with pytest.raises(RelayError) as caught:
        audio.probe(str(AUDIO / "wav_short.wav"), min_seconds=1)
    assert caught.value.fields["audio_duration_seconds"] == pytest.approx(0.3)
    assert caught.value.fields["audio_sample_rate"] == 16000


def test_an_id3_tag_larger_than_the_sniffed_head_is_skipped(tmp_path):
    frames = (AUDIO / "mp3_cbr_bare.mp3").read_bytes()
    padding = 20000  # an ID3v2 tag padded like one carrying cover art
    size = bytes([(padding >> 21) & 0x7F, (padding >> 14) & 0x7F, (padding >> 7) & 0x7F, padding & 0x7F])
    tagged = tmp_path / "big-tag.mp3"
    tagged.write_bytes(b"ID3\x03\x00\x00" + size + b"\0" * padding + frames)
    info = audio.probe(str(tagged), min_seconds=1)
    assert info.format == "mp3"
    assert info.duration_seconds == pytest.approx(2.06, abs=0.06)


@pytest.mark.parametrize("padding, seen", [(20000, "mp3"), (70000, "unknown")])
def test_a_file_still_arriving_is_judged_past_an_id3_tag_that_ends_in_its_head(padding, seen):
    frames = (AUDIO / "mp3_cbr_bare.mp3").read_bytes()
    size = bytes([(padding >> 21) & 0x7F, (padding >> 14) & 0x7F, (padding >> 7) & 0x7F, padding & 0x7F])
    head = (b"ID3\x03\x00\x00" + size + b"\0" * padding + frames)[:65536]
    assert audio.sniff_start(head) == seen


def test_a_damaged_spot_in_an_mp3_does_not_end_its_count(tmp_path):
    # Five copies of a 2.06 s recording (10.3 s), with 600 bytes of noise 0.5 s in: players skip it.
    frames = (AUDIO / "mp3_cbr_bare.mp3").read_bytes()
    whole = frames * 5
    noise = bytes((i * 37 + 11) % 256 for i in range(600))
    damaged = tmp_path / "damaged.mp3"
    damaged.write_bytes(whole[:2000] + noise + whole[2000:])
    info = audio.probe(str(damaged), min_seconds=1)
    assert info.duration_seconds == pytest.approx(5 * 2.064, abs=0.2)


@pytest.mark.parametrize(("junk", "copies"), [(100_000, 2), (2 * 1024 * 1024, 1)], ids=["short", "long"])
def test_the_count_skips_a_damaged_stretch_but_not_a_megabyte_of_junk(tmp_path, junk, copies):
    # Bytes that look like frame headers but are none. A short stretch is skipped as players skip it;
    # past 1 MiB the rest is not audio and is not walked (in Python, 48 MB of it took 20 s).
    frames = (AUDIO / "mp3_cbr_bare.mp3").read_bytes()
    path = tmp_path / "junk.mp3"
    path.write_bytes(frames + b"\xff\xfb\x90\x00" * (junk // 4) + frames)
    info = audio.probe(str(path), min_seconds=1)
    assert info.duration_seconds == pytest.approx(copies * 2.064, abs=0.1)


def test_the_count_ends_after_a_budget_of_would_be_headers(tmp_path):
    # Good frames between stretches of would-be headers, each under 1 MiB: every stretch used to be
    # walked (48 MB took 19 s of CPU in the worker, outside the decoder's limits). Past 100 000
    # would-be headers checked in all, the rest is not counted.
    frames = (AUDIO / "mp3_cbr_bare.mp3").read_bytes()
    path = tmp_path / "stretches.mp3"
    path.write_bytes((frames + b"\xff\xfb\x90\x00" * (900 * 1024 // 4)) * 6)
    info = audio.probe(str(path), min_seconds=1)
    assert info.duration_seconds <= 3 * 2.064 + 0.1  # 6 copies are there; at most 3 are counted


def test_padding_after_an_id3_tag_and_a_stream_cut_mid_frame_are_still_mp3(tmp_path):
    frames = (AUDIO / "mp3_cbr_bare.mp3").read_bytes()
    tag = b"ID3\x03\x00\x00\x00\x00\x00\x0a" + b"TIT2\x00\x00\x00\x02\x00\x00\x00x"[:10]
    padded = tmp_path / "padded.mp3"
    padded.write_bytes(tag + bytes(6000) + frames)  # zeros a tagger left after its tag
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(frames[200:])  # a recording cut 200 bytes into its first frame
    for path in (padded, cut):
        info = audio.probe(str(path), min_seconds=1)
        assert info.format == "mp3"
        assert info.duration_seconds == pytest.approx(2.06, abs=0.1)


def test_a_wav_written_to_a_pipe_is_measured_to_its_end_not_called_truncated(tmp_path):
    # sox writing to a pipe cannot seek back: it declares a data size near 2 GiB as a placeholder.
    data = bytearray((AUDIO / "wav_pcm16_mono.wav").read_bytes())
    at = data.find(b"data")
    data[at + 4 : at + 8] = (0x7FFFF000).to_bytes(4, "little")
    piped = tmp_path / "piped.wav"
    piped.write_bytes(bytes(data))
    info = audio.probe(str(piped), min_seconds=1)
    assert info.duration_seconds == pytest.approx(2.0, abs=0.01)


@pytest.mark.parametrize("riff_size", [0, 36], ids=["riff-0", "riff-36"])
def test_a_wav_whose_recorder_never_wrote_its_sizes_is_measured_to_its_end(tmp_path, riff_size):
    # A recorder killed before it finished its header (Android's AudioRecord pattern): sizes 0.
    data = bytearray((AUDIO / "wav_pcm16_mono.wav").read_bytes())
    data[4:8] = riff_size.to_bytes(4, "little")
    at = data.find(b"data")
    data[at + 4 : at + 8] = (0).to_bytes(4, "little")
    killed = tmp_path / "killed.wav"
    killed.write_bytes(bytes(data))
    info = audio.probe(str(killed), min_seconds=1)
    assert (info.duration_seconds, info.sample_rate, info.channels) == (pytest.approx(2.0, abs=0.01), 16000, 1)


@pytest.mark.parametrize("extra", [b"\0" * 4, bytes(range(100))], ids=["4-zero-bytes", "100-junk-bytes"])
def test_bytes_after_a_complete_m4a_are_ignored_not_called_truncated(tmp_path, extra):
    # A copy or sync tool's padding: players ignore it (it was "truncated", with a garbage box name).
    padded = tmp_path / "padded.m4a"
    padded.write_bytes((AUDIO / "m4a_aac.m4a").read_bytes() + extra)
    assert audio.probe(str(padded), min_seconds=1).duration_seconds == pytest.approx(2.05, abs=0.01)


def test_a_quicktime_movie_is_named_as_one_with_conversion_off():
    with pytest.raises(RelayError) as caught:
        audio.probe(str(Path(__file__).parent / "fixtures" / "media" / "iphone.mov"))
    assert caught.value.error_code == "unsupported_audio_format"
    assert "QuickTime movie" in caught.value.message and "MP4A" not in caught.value.message


def test_mp3_sync_bytes_followed_by_garbage_are_not_mp3(tmp_path):
    fake = tmp_path / "fake.mp3"
    fake.write_bytes(b"\xff\xfb\x90\x64" + bytes(range(256)) * 20)
    with pytest.raises(RelayError) as caught:
        audio.probe(str(fake))
    assert caught.value.error_code == "audio_corrupt"


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>", "xml"),
        (b'{"error": "not found"}', "json"),
        (b"%PDF-1.7\n", "pdf"),
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"PK\x03\x04\x14\x00", "zip"),
        (b"\x1a\x45\xdf\xa3\x9f", "webm"),
        (b"#!AMR\n\x3c", "amr"),
        (b"caff\x00\x01", "caf"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "video"),
        (b"just some words\n", "text"),
    ],
)
def test_sniff_names_common_non_audio(head, kind):
    assert audio.sniff(head) == kind


def test_storage_error_page_says_the_link_expired(tmp_path):
    page = tmp_path / "denied"
    page.write_bytes(
        b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
    )
    with pytest.raises(RelayError) as caught:
        audio.probe(str(page))
    assert caught.value.error_code == "not_audio"
    assert "AccessDenied" in caught.value.message


@pytest.mark.parametrize(
    ("hint", "fmt"),
    [
        ("audio/x-m4a", "m4a"),
        ("audio/mp4", "m4a"),
        ("audio/wave", "wav"),
        ("audio/x-flac", "flac"),
        ("audio/ogg", None),
    ],
)
def test_content_type_names_its_format(hint, fmt):
    assert audio.format_for_content_type(hint) == fmt


# --- structures made to stall the process that reads them (bounded before the metadata library) ----


def _with_empty_wav_chunks(data: bytes, count: int) -> bytes:
    junk = b"junk" + (0).to_bytes(4, "little")
    body = data[:12] + junk * count + data[12:]
    return body[:4] + (len(body) - 8).to_bytes(4, "little") + body[8:]


def _with_flac_padding(data: bytes, count: int) -> bytes:
    assert data[:4] == b"fLaC"
    offset, blocks = 4, []
    while True:  # the file's own blocks, the last flag cleared
        header = data[offset : offset + 4]
        length = int.from_bytes(header[1:4], "big")
        blocks.append(bytes([header[0] & 0x7F]) + data[offset + 1 : offset + 4 + length])
        offset += 4 + length
        if header[0] & 0x80:
            break
    padding = [bytes([1]) + (0).to_bytes(3, "big")] * count
    padding[-1] = bytes([0x81]) + (0).to_bytes(3, "big")  # the last one
    return b"fLaC" + b"".join(blocks) + b"".join(padding) + data[offset:]


def _mp4_boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    boxes, offset = [], 0
    while offset < len(data):
        size, name = int.from_bytes(data[offset : offset + 4], "big"), data[offset + 4 : offset + 8]
        boxes.append((name, data[offset : offset + size]))
        offset += size
    return boxes


def _with_atoms_in_moov(data: bytes, count: int) -> bytes:
    """An empty-atom 'udta' appended inside 'moov' (placed after 'mdat' so no offset moves)."""
    out = []
    for name, box in _mp4_boxes(data):
        if name == b"moov":
            udta_body = b"\x00\x00\x00\x08free" * count
            udta = (8 + len(udta_body)).to_bytes(4, "big") + b"udta" + udta_body
            box = (len(box) + len(udta)).to_bytes(4, "big") + box[4:] + udta
        out.append((name, box))
    out.sort(key=lambda item: item[0] == b"moov")  # the index last: the audio's offsets stay right
    return b"".join(box for _, box in out)


@pytest.mark.parametrize(
    ("source", "build", "says"),
    [
        ("wav_pcm16_mono.wav", lambda data: _with_empty_wav_chunks(data, 300), "WAV chunks"),
        ("flac_mono.flac", lambda data: _with_flac_padding(data, 300), "FLAC metadata blocks"),
        ("m4a_aac.m4a", lambda data: data + b"\x00\x00\x00\x08free" * 300, "top-level MP4 boxes"),
        ("m4a_aac.m4a", lambda data: _with_atoms_in_moov(data, 10_001), "atoms in the MP4 index"),
    ],
    ids=["wav-chunks", "flac-blocks", "mp4-boxes", "mp4-atoms"],
)
def test_a_file_of_countless_empty_structures_is_refused_before_the_metadata_library_reads_it(
    tmp_path, source, build, says
):
    """Millions of empty chunks, blocks or atoms made mutagen build an object for each in the web
    process (14-40 s of CPU, 1-1.7 GB each, in review). A recording holds a handful: past a count
    the file is refused, whatever the count that follows."""
    path = tmp_path / source
    path.write_bytes(build((AUDIO / source).read_bytes()))
    with pytest.raises(RelayError) as caught:
        audio.probe(str(path))
    assert caught.value.error_code == "audio_corrupt" and says in caught.value.message


@pytest.mark.parametrize("source", ["wav_pcm16_mono.wav", "flac_mono.flac", "m4a_aac.m4a"])
def test_a_few_extra_structures_are_read_as_before(tmp_path, source):
    build = {
        "wav_pcm16_mono.wav": lambda data: _with_empty_wav_chunks(data, 20),
        "flac_mono.flac": lambda data: _with_flac_padding(data, 20),
        "m4a_aac.m4a": lambda data: _with_atoms_in_moov(data, 200),
    }[source]
    path = tmp_path / source
    path.write_bytes(build((AUDIO / source).read_bytes()))
    assert audio.probe(str(path)).duration_seconds > 1.9


def test_an_id3_tag_whose_size_is_a_plain_integer_is_skipped(tmp_path):
    """A tagger that wrote the size as a plain integer (a high bit set in a size byte): ffmpeg and
    mutagen read such a file; it was refused as not_audio."""
    size = 0x028000  # bytes 00 02 80 00: not syncsafe (read so, 49152 bytes: short of the audio by 112 KiB)
    tag = b"ID3\x03\x00\x00" + size.to_bytes(4, "big") + b"\x00" * size
    path = tmp_path / "plain-size.mp3"
    path.write_bytes(tag + (AUDIO / "mp3_cbr_bare.mp3").read_bytes())
    info = audio.probe(str(path))
    assert info.format == "mp3" and 2.0 < info.duration_seconds < 2.1


def test_a_recorder_killed_before_writing_sizes_may_begin_with_silence(tmp_path):
    """RIFF and data sizes 0, and the samples start with digital silence: zeros must not be counted
    as empty chunks (the data runs to the end of the file)."""
    data = (AUDIO / "wav_pcm16_mono.wav").read_bytes()
    start = data.index(b"data")
    body = data[: start + 4] + b"\x00\x00\x00\x00" + b"\x00" * 8000 + data[start + 8 :]
    path = tmp_path / "killed.wav"
    path.write_bytes(body[:4] + b"\x00\x00\x00\x00" + body[8:])
    info = audio.probe(str(path))
    assert info.format == "wav" and 2.2 < info.duration_seconds < 2.3  # 2 s, and the 0.25 s of silence


def test_a_wav_or_flac_with_damaged_tags_is_measured_from_its_audio(tmp_path):
    """The length comes from the 'fmt '/'data' chunks and from STREAMINFO, never from a parse of the
    tags (a crafted tag made that parse take minutes): a file with damaged tags still plays, and is read."""
    wav = (AUDIO / "wav_pcm16_mono.wav").read_bytes()
    tag = b"ID3\x04\x00\x00\x00\x00\x02\x00" + b"\xff" * 256  # an ID3 tag of garbage frames
    chunk = b"id3 " + len(tag).to_bytes(4, "little") + tag
    body = wav + chunk
    (tmp_path / "tagged.wav").write_bytes(body[:4] + (len(body) - 8).to_bytes(4, "little") + body[8:])
    assert audio.probe(str(tmp_path / "tagged.wav")).duration_seconds == pytest.approx(2.0, abs=0.01)
    flac = bytearray((AUDIO / "flac_mono.flac").read_bytes())
    offset = 4
    while True:  # damage the Vorbis comment block's contents, not its size
        header = flac[offset : offset + 4]
        length = int.from_bytes(header[1:4], "big")
        if header[0] & 0x7F == 4:
            flac[offset + 4 : offset + 4 + length] = b"\xff" * length
        offset += 4 + length
        if header[0] & 0x80:
            break
    (tmp_path / "tagged.flac").write_bytes(bytes(flac))
    assert audio.probe(str(tmp_path / "tagged.flac")).duration_seconds == pytest.approx(2.0, abs=0.01)


def test_a_fragmented_m4a_of_many_fragments_goes_to_the_converter_not_refused(tmp_path):
    """A browser's or OBS's fragmented M4A holds two boxes per fragment: hundreds of them is a
    recording of a few minutes, sent to the converter, not a file made to stall the server."""
    import av

    path = tmp_path / "fragments.m4a"
    with av.open(str(AUDIO / "m4a_aac.m4a")) as source:
        stream = source.streams.audio[0]
        packets = [packet for packet in source.demux(stream) if packet.dts is not None]
        times = [(packet.pts, packet.dts) for packet in packets]
        step = packets[-1].dts - packets[0].dts + packets[-1].duration  # each round after the last, dts rising
        options = {"movflags": "frag_keyframe+empty_moov", "frag_duration": "40000"}
        with av.open(str(path), "w", format="mp4", options=options) as out:
            copy = out.add_stream_from_template(stream)
            for round_ in range(4):  # 8 s in fragments of a frame or two: a few hundred boxes
                for packet, (pts, dts) in zip(packets, times, strict=True):
                    packet.stream, packet.pts, packet.dts = copy, pts + step * round_, dts + step * round_
                    out.mux(packet)
    boxes = audio._top_level_boxes(str(path), path.stat().st_size)
    assert boxes.count(b"moof") == 1  # the walk stops at the first fragment: it is the converter's
    with open(path, "rb") as handle:
        assert handle.read().count(b"moof") > audio.MAX_STRUCTURES // 2
    with pytest.raises(RelayError) as caught:
        audio.probe(str(path))
    assert caught.value.error_code == "unsupported_audio_format" and "fragmented" in caught.value.message
    with pytest.raises(RelayError) as caught:
        audio.probe(str(path))
    assert caught.value.error_code == "unsupported_audio_format" and "fragmented" in caught.value.message
