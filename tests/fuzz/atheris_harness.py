"""Coverage-guided fuzzing of the frame decoder, request parsing and batch validation (atheris).

Run by hand, not in CI (atheris is not a test dependency)::

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/atheris_harness.py -max_total_time=300 -rss_limit_mb=4096 \\
        tests/fuzz/corpus          # optional corpus directory (created and grown by libFuzzer)

One input is split by its first byte into a target: a frame body (frames.decode_body, then the
envelope and every request parser on the decoded header), a simple produce message, a record
batch buffer (batch.scan_batches, then the full check and the CRC of what it accepted) or a batch
body (records.decode_body). Each target may only succeed or raise its documented error; anything
else is reported by atheris as a crash with the input saved to crash-<sha1>. Keep every such
input as an @example in test_fuzz_protocol.py (the regression tests), then fix the code.
"""

from __future__ import annotations

import inspect
import sys

import atheris

with atheris.instrument_imports():
    from rustmq.protocol import api, batch, frames, records, simple
    from rustmq.storage import errors

PARSERS = [function for name, function in inspect.getmembers(api, inspect.isfunction)
           if name.startswith("parse_")]


def one_input(data: bytes) -> None:
    if not data:
        return
    target, rest = data[0] % 4, data[1:]
    if target == 0:
        try:
            header, _ = frames.decode_body(memoryview(rest))
        except frames.FrameError:
            return
        for parser in PARSERS:
            arguments = [header] + [1 << 20] * (len(inspect.signature(parser).parameters) - 1)
            try:
                parser(*arguments)
            except api.RequestError:
                pass
    elif target == 1:
        try:
            simple.decode_message(rest)
        except api.RequestError:
            pass
    elif target == 2:
        try:
            batch.scan_batches(rest)
        except errors.CorruptBatchError:
            return
        view = memoryview(rest)
        for position, header in batch.iter_batches(view):
            batch.check_batch(view, position, len(view))
            batch.verify_crc(view, position, header)
    else:
        try:
            records.decode_body(rest[1:], rest[0] % 8 if rest else 0)
        except records.RecordDecodeError:
            pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
