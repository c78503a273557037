"""One continuous fragmented MP4 for a live session, and the pieces it is made of.

    encode_gop(frames (N, H, W, 3) uint8)       -> N H.264 access units, Annex-B, the first an IDR
    AacTrack.push(pcm float32 at 16 kHz)        -> AAC frames of 1024 samples at 48 kHz
    LiveMP4(width, height, fps, ...)
        .fragment(video units, audio frames)    -> [init segment, once] moof + mdat, at once

A live session mixes pieces made apart: idle frames encoded once per avatar and reused, speech
frames encoded per batch on the lip-sync stage, audio encoded continuously at the ingress. Each
piece of video is a closed GOP from its own encoder (x264 with identical settings writes identical
parameter sets, so one init segment serves them all: `LiveMP4` checks it), and may be cut after any
frame: the next piece starts with an IDR.

The boxes are written here by hand, not by FFmpeg's MP4 muxer: with `frag_keyframe` it holds each
fragment until the next keyframe arrives (a GOP of latency) and PyAV offers no way to cut one
earlier, while a live stream must send each fragment the moment its frames exist. The layout is
the plain ISO BMFF one every MSE player reads (ISO/IEC 14496-12 and -15): ftyp + moov (avc1 with
avcC, mp4a with esds, an edit list that hides the AAC encoder's priming, mvex) once, then per
fragment a moof (mfhd, one traf per track with tfhd default-base-is-moof, tfdt, trun) and its mdat.
"""

from __future__ import annotations

import fractions
import struct

import numpy as np

from deployments.media.audio import SAMPLE_RATE

VIDEO_TIMESCALE = 90000  # ticks per second of the video track (whole ticks per frame at 16, 24, 25 fps)
SYNC_SAMPLE = 0x02000000  # sample_depends_on = 2: an IDR
NON_SYNC_SAMPLE = 0x01010000  # depends on others, not a sync sample
IDENTITY = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
NAL_SPS, NAL_PPS, NAL_IDR = 7, 8, 5


# ------------------------------------------------------------------ H.264


def nal_units(annexb: bytes) -> list[bytes]:
    """An Annex-B byte stream -> its NAL units, without start codes."""
    units, i, n = [], 0, len(annexb)
    starts = []
    while i < n - 2:
        if annexb[i] == 0 and annexb[i + 1] == 0 and annexb[i + 2] == 1:
            starts.append(i + 3)
            i += 3
        else:
            i += 1
    for k, start in enumerate(starts):
        end = starts[k + 1] - 3 if k + 1 < len(starts) else n
        unit = annexb[start:end]
        units.append(unit.rstrip(b"\x00") if k + 1 < len(starts) else unit)  # a 4-byte start code's leading zero
    return [u for u in units if u]


def split_access_unit(annexb: bytes) -> tuple[list[bytes], bytes, bool]:
    """One encoded frame (Annex-B) -> (its parameter sets, its other NAL units length-prefixed as
    an MP4 sample, whether it is an IDR). Parameter sets go to the init segment instead."""
    params, sample, idr = [], bytearray(), False
    for unit in nal_units(annexb):
        kind = unit[0] & 0x1F
        if kind in (NAL_SPS, NAL_PPS):
            params.append(unit)
        else:
            idr |= kind == NAL_IDR
            sample += struct.pack(">I", len(unit)) + unit
    return params, bytes(sample), idr


def encode_gop(frames: np.ndarray, fps: int, crf: int = 20, preset: str = "veryfast", threads: int = 0,
               codec: str = "libx264") -> list[bytes]:
    """uint8 frames (N, H, W, 3) RGB or (N, H, W, 4) RGBA -> N access units (Annex-B bytes, SPS
    and PPS in-band in the first), a closed GOP from an IDR, no B-frames: decodable alone, and
    cuttable after any frame. Every call uses a fresh encoder with the same settings."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (3, 4) or not len(frames):
        raise ValueError(f"expected uint8 frames (N, H, W, 3 or 4), got {frames.dtype} {frames.shape}")
    n, h, w, channels = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even width and height, got {w}x{h}")
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height = w, h
    ctx.time_base, ctx.framerate = fractions.Fraction(1, fps), fps
    gop = {"g": str(max(n, 1) + 1), "keyint_min": str(max(n, 1) + 1)}
    if codec == "h264_nvenc":
        ctx.pix_fmt = "rgba" if channels == 4 else "yuv420p"
        ctx.options = {"preset": "p2", "tune": "ull", "zerolatency": "1", "delay": "0", "bf": "0",
                       "rc": "constqp", "qp": str(crf + 3), **gop}
    else:
        ctx.pix_fmt = "yuv420p"
        ctx.options = {"crf": str(crf), "preset": preset, "tune": "zerolatency", "threads": str(threads),
                       "sc_threshold": "0", "bframes": "0", **gop}
    units = []
    fmt = "rgba" if channels == 4 else "rgb24"
    for i, frame in enumerate(frames):
        image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=fmt)
        if ctx.pix_fmt == "yuv420p":
            image = image.reformat(format="yuv420p")
        image.pts = i
        units += [bytes(p) for p in ctx.encode(image)]
    units += [bytes(p) for p in ctx.encode(None)]
    if len(units) != n:
        raise RuntimeError(f"the encoder gave {len(units)} packets for {n} frames")
    return units


def avcc(sps: bytes, pps: bytes) -> bytes:
    """The avcC box's payload (AVCDecoderConfigurationRecord) for one SPS and one PPS, 4-byte NAL
    lengths."""
    record = bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]) + struct.pack(">H", len(sps)) + sps
    record += bytes([1]) + struct.pack(">H", len(pps)) + pps
    if sps[1] in (100, 110, 122, 144):  # High profiles: chroma format 4:2:0, 8-bit, no SPS extensions
        record += bytes([0xFC | 1, 0xF8, 0xF8, 0])
    return record


# ------------------------------------------------------------------ AAC


class AacTrack:
    """A session's audio: 16 kHz float PCM pushed as it is played -> AAC-LC frames at `rate`
    (1024 samples each), from one encoder for the whole session. The first frame carries the
    encoder's priming (`priming` samples), which the init segment's edit list hides."""

    def __init__(self, rate: int = 48000, bitrate: int = 64000, sample_rate: int = SAMPLE_RATE):
        import av

        self._av = av
        self.rate, self.sample_rate = rate, sample_rate
        self._ctx = av.CodecContext.create("aac", "w")
        self._ctx.sample_rate, self._ctx.layout, self._ctx.format = rate, "mono", "fltp"
        self._ctx.bit_rate = bitrate
        self._ctx.time_base = fractions.Fraction(1, rate)
        self._ctx.flags |= av.codec.context.Flags.global_header
        self._ctx.open()
        self.config = bytes(self._ctx.extradata)  # AudioSpecificConfig, for the esds box
        self.priming = 1024
        self._resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
        self._pushed = 0

    def push(self, pcm: np.ndarray) -> list[bytes]:
        """float32 (S,) at 16 kHz -> the AAC frames completed so far."""
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.ndim != 1 or not len(pcm):
            return []
        frame = self._av.AudioFrame.from_ndarray(pcm[None], format="flt", layout="mono")
        frame.sample_rate, frame.pts = self.sample_rate, self._pushed
        self._pushed += len(pcm)
        out = []
        for resampled in self._resampler.resample(frame):
            out += [bytes(p) for p in self._ctx.encode(resampled)]
        return out


# ------------------------------------------------------------------ boxes


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def _full(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def _descriptor(tag: int, body: bytes) -> bytes:
    if len(body) > 127:
        raise ValueError("descriptor too long for a one-byte length")
    return bytes([tag, len(body)]) + body


def _track(track_id: int, timescale: int, handler: bytes, name: bytes, media_header: bytes,
           sample_entry: bytes, width: int = 0, height: int = 0, volume: int = 0, edit: bytes = b"") -> bytes:
    tkhd = _full(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, track_id, 0, 0), bytes(8),
                 struct.pack(">hhhH", 0, 0, volume, 0), IDENTITY, struct.pack(">II", width << 16, height << 16))
    mdhd = _full(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, 0x55C4, 0))  # language "und"
    hdlr = _full(b"hdlr", 0, 0, bytes(4), handler, bytes(12), name + b"\0")
    dinf = _box(b"dinf", _full(b"dref", 0, 0, struct.pack(">I", 1), _full(b"url ", 0, 1)))
    empty = (_full(b"stts", 0, 0, bytes(4)), _full(b"stsc", 0, 0, bytes(4)),
             _full(b"stsz", 0, 0, bytes(8)), _full(b"stco", 0, 0, bytes(4)))
    stbl = _box(b"stbl", _full(b"stsd", 0, 0, struct.pack(">I", 1), sample_entry), *empty)
    minf = _box(b"minf", media_header, dinf, stbl)
    return _box(b"trak", tkhd, edit, _box(b"mdia", mdhd, hdlr, minf))


class LiveMP4:
    """The fragmented MP4 of one live session: H.264 video (track 1) and AAC audio (track 2).

    `fragment(video, audio)` -> bytes to send now: the init segment before the first fragment,
    then a moof + mdat holding `video` (access units as `encode_gop` made them, each one frame)
    and `audio` (AAC frames). Decode times continue from the previous fragment; the parameter sets
    of every GOP must be those of the first (all encoders share their settings)."""

    def __init__(self, width: int, height: int, fps: int, audio: AacTrack):
        self.width, self.height, self.fps, self.audio = width, height, fps, audio
        self.frame_ticks = VIDEO_TIMESCALE // fps
        if self.frame_ticks * fps != VIDEO_TIMESCALE:
            raise ValueError(f"{fps} fps does not divide the video timescale {VIDEO_TIMESCALE}")
        self.params: list[bytes] | None = None
        self.sequence = 0
        self.video_time = 0  # ticks of the video track already sent
        self.audio_time = 0  # samples of the audio track already sent (priming included)
        self.frames = 0

    def init_segment(self) -> bytes:
        sps, pps = self.params
        ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isom", b"iso5", b"iso6", b"avc1", b"mp41")
        mvhd = _full(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, 1000, 0), struct.pack(">IH", 0x10000, 0x100),
                     bytes(10), IDENTITY, bytes(24), struct.pack(">I", 3))
        avc1 = _box(b"avc1", bytes(6), struct.pack(">H", 1), bytes(16), struct.pack(">HH", self.width, self.height),
                    struct.pack(">II", 0x480000, 0x480000), bytes(4), struct.pack(">H", 1), bytes(32),
                    struct.pack(">hh", 0x18, -1), _box(b"avcC", avcc(sps, pps)))
        video = _track(1, VIDEO_TIMESCALE, b"vide", b"VideoHandler", _full(b"vmhd", 0, 1, bytes(8)), avc1,
                       self.width, self.height)
        rate = self.audio.rate
        es = _descriptor(0x03, struct.pack(">HB", 2, 0) + _descriptor(
            0x04, bytes([0x40, 0x15]) + bytes(3) + struct.pack(">II", 0, 0) + _descriptor(0x05, self.audio.config))
            + _descriptor(0x06, b"\x02"))
        mp4a = _box(b"mp4a", bytes(6), struct.pack(">H", 1), bytes(8), struct.pack(">HHHH", 1, 16, 0, 0),
                    struct.pack(">I", rate << 16), _full(b"esds", 0, 0, es))
        # The edit list starts the audio after the encoder's priming, so sample 0 of the speech plays
        # with video frame 0 (segment duration 0: the whole fragmented track).
        edit = _box(b"edts", _full(b"elst", 0, 0, struct.pack(">IIiHH", 1, 0, self.audio.priming, 1, 0)))
        audio = _track(2, rate, b"soun", b"SoundHandler", _full(b"smhd", 0, 0, bytes(4)), mp4a, volume=0x100,
                       edit=edit)
        trex = [_full(b"trex", 0, 0, struct.pack(">IIIII", track, 1, 0, 0, 0)) for track in (1, 2)]
        return ftyp + _box(b"moov", mvhd, video, audio, _box(b"mvex", *trex))

    def fragment(self, video: list[bytes], audio: list[bytes]) -> bytes:
        """Annex-B access units (one per frame) + AAC frames -> [init segment +] moof + mdat."""
        samples, flags, header = [], [], b""
        for unit in video:
            params, sample, idr = split_access_unit(unit)
            if params:
                sets = [p for p in params if p[0] & 0x1F == NAL_SPS][:1] + [p for p in params if p[0] & 0x1F == NAL_PPS][:1]
                if self.params is None:
                    self.params = sets
                    header = self.init_segment()
                elif sets != self.params:
                    raise ValueError("a GOP's parameter sets differ from the stream's: its encoder was set up "
                                     "differently")
            if self.params is None:
                raise ValueError("the stream must start with an IDR carrying its parameter sets")
            samples.append(sample)
            flags.append(SYNC_SAMPLE if idr else NON_SYNC_SAMPLE)
        self.sequence += 1

        def moof(offsets: tuple[int, int]) -> bytes:
            trafs = []
            if samples:
                rows = b"".join(struct.pack(">III", self.frame_ticks, len(s), f) for s, f in zip(samples, flags))
                trafs.append(_box(b"traf", _full(b"tfhd", 0, 0x020000, struct.pack(">I", 1)),
                                  _full(b"tfdt", 1, 0, struct.pack(">Q", self.video_time)),
                                  _full(b"trun", 0, 0x000701, struct.pack(">Ii", len(samples), offsets[0]), rows)))
            if audio:
                rows = b"".join(struct.pack(">II", 1024, len(a)) for a in audio)
                trafs.append(_box(b"traf", _full(b"tfhd", 0, 0x020000, struct.pack(">I", 2)),
                                  _full(b"tfdt", 1, 0, struct.pack(">Q", self.audio_time)),
                                  _full(b"trun", 0, 0x000301, struct.pack(">Ii", len(audio), offsets[1]), rows)))
            return _box(b"moof", _full(b"mfhd", 0, 0, struct.pack(">I", self.sequence)), *trafs)

        video_bytes = b"".join(samples)
        size = len(moof((0, 0))) + 8
        box = moof((size, size + len(video_bytes)))
        self.video_time += self.frame_ticks * len(samples)
        self.audio_time += 1024 * len(audio)
        self.frames += len(samples)
        return header + box + _box(b"mdat", video_bytes, *audio)
