"""The shim's stdio plumbing without runc: CRI log formatting, FIFO copies and writer back-pressure."""

from __future__ import annotations

import os
import re
from pathlib import Path

from shims.common import aio
from shims.common import writer as writer_mod
from shims.common.stdio import CRI_LINE_MAX, CriLogSink, ProcessIO
from shims.common.writer import FileWriter

LINE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr) (F|P) (.*)$")


def parse(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    out = []
    for raw in path.read_bytes().splitlines():
        m = LINE.match(raw)
        assert m, raw
        out.append((m.group(1), m.group(2), m.group(3)))
    return out


def test_cri_sink_splits_lines_and_long_lines(tmp_path: Path) -> None:
    w = FileWriter()
    log = tmp_path / "c.log"
    sink = CriLogSink(w, str(log))
    sink.feed(b"stdout", b"a\nb")
    sink.feed(b"stderr", b"e1\n")
    sink.feed(b"stdout", b"c\n" + b"x" * (CRI_LINE_MAX * 2 + 5))
    sink.flush(b"stdout")
    sink.flush(b"stderr")
    w.stop()
    lines = parse(log)
    assert lines[:3] == [(b"stdout", b"F", b"a"), (b"stderr", b"F", b"e1"), (b"stdout", b"F", b"bc")]
    parts = [(s, t, len(c)) for s, t, c in lines[3:]]
    assert parts == [(b"stdout", b"P", CRI_LINE_MAX), (b"stdout", b"P", CRI_LINE_MAX), (b"stdout", b"F", 5)]


def test_reopen_after_rename_creates_a_new_file(tmp_path: Path) -> None:
    aio.run(_reopen_after_rename(tmp_path))


async def _reopen_after_rename(tmp_path: Path) -> None:
    w = FileWriter()
    log = tmp_path / "c.log"
    io = ProcessIO(w, "", f"crilog://{log}", f"crilog://{log}", terminal=False)
    io.prepare()
    await io.open_logs(5.0)
    assert log.exists() and log.read_bytes() == b"", "the log exists before anything is written"
    sink = CriLogSink(w, str(log))
    sink.feed(b"stdout", b"one\n")
    os.rename(log, tmp_path / "c.log.1")
    sink.feed(b"stdout", b"before-reopen\n")
    await sink.reopen(5.0)
    assert log.exists(), "reopen returns once the new file exists"
    sink.feed(b"stdout", b"two\n")
    w.stop()
    io.close()
    # Queued before the reopen: the renamed file; after it: the new one. No line lost.
    assert [c for _, _, c in parse(tmp_path / "c.log.1")] == [b"one", b"before-reopen"]
    assert [c for _, _, c in parse(log)] == [b"two"]


def test_fifo_output_is_copied_and_crilog_backpressure_resumes(tmp_path: Path, monkeypatch: object) -> None:
    aio.run(_fifo_output_and_backpressure(tmp_path, monkeypatch))


async def _fifo_output_and_backpressure(tmp_path: Path, monkeypatch: object) -> None:
    monkeypatch.setattr(writer_mod, "HIGH_WATER", 1024)  # type: ignore[attr-defined]
    monkeypatch.setattr(writer_mod, "LOW_WATER", 256)  # type: ignore[attr-defined]
    w = FileWriter()
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    log = tmp_path / "c.log"
    io = ProcessIO(w, "", str(fifo), f"crilog://{log}", terminal=False)
    io.prepare()
    _, out_w, err_w = io.stdio
    out_w, err_w = os.dup(out_w), os.dup(err_w)  # what the "process" holds
    io.start_copies()
    for i in range(200):
        os.write(err_w, b"line %d %s\n" % (i, b"y" * 100))
    os.write(out_w, b"to the fifo\n")
    os.close(out_w)
    os.close(err_w)
    await io.drain(5.0)
    await aio.sleep(0.1)
    w.stop()
    data = b""
    while True:
        try:
            chunk = os.read(reader, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    os.close(reader)
    assert data == b"to the fifo\n"
    lines = parse(log)
    assert len(lines) == 200 and lines[-1][2].startswith(b"line 199 ")
    io.close()
