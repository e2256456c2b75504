"""Small media made in the tests: PNGs of any declared size, short clips (PyAV), without touching the disk."""

from __future__ import annotations

import io
import struct
import tempfile
import zlib
from pathlib import Path

import av
import numpy as np
from PIL import Image


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries one tiny compressed row: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def clip_bytes(frames: int, width: int = 96, height: int = 64, fps: int = 10, faststart: bool = False) -> bytes:
    """An mpeg4 mp4 of `frames` frames; with faststart the index comes first, so a cut file still opens."""
    options = {"movflags": "faststart"} if faststart else {}
    with tempfile.TemporaryDirectory() as folder:  # faststart rewrites the file: it needs a real one
        path = Path(folder) / "clip.mp4"
        with av.open(str(path), mode="w", options=options) as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.bit_rate = 400_000
            rng = np.random.default_rng(frames)
            for _ in range(frames):
                image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return path.read_bytes()
