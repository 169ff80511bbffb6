"""Records inside a record batch body, and the per-batch compression codecs.

The storage layer frames, checksums and stores a batch but treats its body as opaque; this
module defines that body. Before compression the body is one msgpack array with one entry per
record::

    body   := msgpack array of record          (record_count entries)
    record := [timestamp_delta:int, key:bin|nil, value:bin|nil, headers:nil|[[str, bin], ...]]

A record's offset is the batch's base_offset plus its position in the array, and its timestamp
is the batch's first_timestamp_ms plus timestamp_delta. The whole body is then compressed with
the codec named in the low three bits of the batch attributes (0 none, 1 gzip, 2 zstd, 3 lz4;
gzip is RFC 1952, zstd a zstd frame, lz4 an LZ4 frame). Producers choose the codec per batch;
the broker never decompresses or decodes a body, so one msgpack call per batch is all the
decoding a consumer does.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Sequence
from typing import Any, Final

import lz4.frame
import msgpack
import zstandard

CODEC_NONE: Final = 0
CODEC_GZIP: Final = 1
CODEC_ZSTD: Final = 2
CODEC_LZ4: Final = 3
CODEC_NAMES: Final = {"none": CODEC_NONE, "gzip": CODEC_GZIP, "zstd": CODEC_ZSTD, "lz4": CODEC_LZ4}
CODEC_MASK: Final = 0x07

# A decompressed body larger than this is rejected (a compression bomb, or not our data).
MAX_DECOMPRESSED_BYTES: Final = 256 << 20

Record = Sequence[Any]  # [timestamp_delta, key, value, headers]

_zstd_compressor = zstandard.ZstdCompressor(level=3)
_zstd_decompressor = zstandard.ZstdDecompressor()


class RecordDecodeError(Exception):
    """A batch body that does not decode (unknown codec, corrupt compression, bad msgpack)."""


def compress(body: bytes, codec: int) -> bytes:
    if codec == CODEC_NONE:
        return body
    if codec == CODEC_GZIP:
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
        return compressor.compress(body) + compressor.flush()
    if codec == CODEC_ZSTD:
        return _zstd_compressor.compress(body)
    if codec == CODEC_LZ4:
        return lz4.frame.compress(body)
    raise ValueError(f"unknown codec {codec}")


def decompress(data: bytes | memoryview, codec: int) -> bytes | memoryview:
    try:
        if codec == CODEC_NONE:
            return data
        if codec == CODEC_GZIP:
            decompressor = zlib.decompressobj(31)
            out = decompressor.decompress(data, MAX_DECOMPRESSED_BYTES)
            if decompressor.unconsumed_tail:
                raise RecordDecodeError("gzip body decompresses beyond the size limit")
            return out
        if codec == CODEC_ZSTD:
            return _zstd_decompressor.decompress(data, max_output_size=MAX_DECOMPRESSED_BYTES)
        if codec == CODEC_LZ4:
            return lz4.frame.decompress(bytes(data))
    except RecordDecodeError:
        raise
    except Exception as exc:  # each codec has its own error types
        raise RecordDecodeError(f"cannot decompress codec {codec} body: {exc}") from None
    raise RecordDecodeError(f"unknown codec {codec}")


def encode_body(records: Sequence[Record], codec: int = CODEC_NONE) -> bytes:
    """The (compressed) body for records given as [timestamp_delta, key, value, headers] lists."""
    return compress(_packer().pack(records), codec)


# msgpack.packb starts from a small buffer and grows it by reallocation, which made encoding a
# 1 MiB batch several times slower than packing into a buffer that is already large; so each
# thread keeps one Packer whose buffer survives between batches.
_PACK_BUFFER_BYTES: Final = 2 << 20
_local = threading.local()


def _packer() -> msgpack.Packer:
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True, buf_size=_PACK_BUFFER_BYTES)
    return packer


def decode_body(body: bytes | memoryview, codec: int) -> tuple[Any, ...]:
    """The (timestamp_delta, key, value, headers) entries of a batch body, as tuples.

    Tuples, not lists, all the way down (headers too): msgpack builds them markedly faster.
    """
    raw = decompress(body, codec)
    try:
        records = msgpack.unpackb(raw, raw=False, use_list=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise RecordDecodeError(f"batch body is not valid msgpack: {exc}") from None
    if not isinstance(records, tuple):
        raise RecordDecodeError("batch body is not a msgpack array")
    return records
