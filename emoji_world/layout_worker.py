"""Sample training layouts (and tokenize their captions) in worker processes.

On a GPU, drawing a batch takes milliseconds but sampling its 512 layouts with
:func:`emoji_world.common.sample_batch` takes ~35-70 ms of Python, and a thread cannot help
(the GIL).  ``LayoutWorkers`` runs ``python -m emoji_world.layout_worker`` processes: worker ``k`` of
``W`` produces the batches of steps ``start + k``, ``start + k + W``, … and writes each to its
stdout as one record (no pickle): an 8-byte length, a JSON header (step, captions, colour indices)
and the int32 placement table ``(image, sprite, size, x, y, flip)`` and token ids.  A pipe holds a
record or two, so each worker stays only a little ahead.  Same layouts and captions as
``sample_batch`` (the workers call it), so a run is the same whichever way its layouts come.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

PLACED_COLUMNS = 6  # image, sprite index, size, x, y, flip


def placement_table(layouts) -> np.ndarray:
    """(n, 6) int64: one row per placed sprite of a batch of layouts."""
    rows = [(b, p.index, p.size, p.x, p.y, p.flip) for b, lay in enumerate(layouts) for p in lay.objects]
    return np.asarray(rows, dtype=np.int64).reshape(-1, PLACED_COLUMNS)


def encode_record(step: int, layouts, captions: list[str], token_ids: np.ndarray) -> bytes:
    from .compose import COLOURS

    colour_index = {name: i for i, name in enumerate(COLOURS)}
    placed = placement_table(layouts).astype(np.int32)
    ids = np.ascontiguousarray(token_ids, dtype=np.int32)
    header = json.dumps(
        {
            "step": step,
            "captions": captions,
            "colours": [colour_index[lay.colour] for lay in layouts],
            "placed": list(placed.shape),
            "ids": list(ids.shape),
        }
    ).encode()
    body = struct.pack("<I", len(header)) + header + placed.tobytes() + ids.tobytes()
    return struct.pack("<Q", len(body)) + body


def decode_record(body: bytes) -> dict:
    (size,) = struct.unpack_from("<I", body)
    header = json.loads(body[4 : 4 + size])
    offset = 4 + size
    placed_count = int(np.prod(header["placed"]))
    placed = np.frombuffer(body, np.int32, placed_count, offset).reshape(header["placed"])
    ids = np.frombuffer(body, np.int32, int(np.prod(header["ids"])), offset + 4 * placed_count)
    return {**header, "placed": placed.astype(np.int64), "ids": ids.reshape(header["ids"]).astype(np.int64)}


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise RuntimeError("a layout worker stopped (see its messages above)")
    return data


class LayoutWorkers:
    """``workers`` processes sampling the batches of consecutive steps from ``start`` on."""

    def __init__(
        self,
        names: list[str],
        batch_size: int,
        seed: int,
        p_drop_caption: float,
        p_pair: float,
        start: int,
        workers: int,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.start, self.next_step = start, start
        # this checkout's emoji_world first, then whatever the trainer was given (e.g. a carried site)
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.procs = []
        for k in range(workers):
            args = [batch_size, seed, p_drop_caption, p_pair, start + k, workers]
            proc = subprocess.Popen(
                [sys.executable, "-m", "emoji_world.layout_worker", *map(str, args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            proc.stdin.write(json.dumps(names).encode())
            proc.stdin.close()
            self.procs.append(proc)

    def get(self, step: int) -> dict:
        """The record of ``step`` (steps must be asked for in order, one after another)."""
        if step != self.next_step:
            raise ValueError(f"layout workers produce step {self.next_step} next, not {step}")
        proc = self.procs[(step - self.start) % len(self.procs)]
        (size,) = struct.unpack("<Q", _read_exact(proc.stdout, 8))
        record = decode_record(_read_exact(proc.stdout, size))
        if record["step"] != step:
            raise RuntimeError(f"layout worker sent step {record['step']} for step {step}")
        self.next_step += 1
        return record

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs = []


def main(argv: list[str] | None = None) -> None:
    """Worker: ``batch_size seed p_drop_caption p_pair first_step stride``; names as JSON on stdin."""
    from transformers import BertTokenizer

    from .common import TOKENIZER_MAX_LENGTH, sample_batch, text_model_dir

    batch_size, seed, p_drop, p_pair, step, stride = (argv if argv is not None else sys.argv[1:])[:6]
    names = json.loads(sys.stdin.buffer.read())
    tokenizer = BertTokenizer.from_pretrained(text_model_dir(), model_max_length=TOKENIZER_MAX_LENGTH)
    step, stride = int(step), int(stride)
    out = sys.stdout.buffer
    try:
        while True:
            layouts, captions = sample_batch(names, int(batch_size), int(seed), step, float(p_drop), float(p_pair))
            ids = tokenizer(
                captions, padding="max_length", max_length=TOKENIZER_MAX_LENGTH, truncation=True, return_tensors="np"
            ).input_ids
            out.write(encode_record(step, layouts, captions, ids))
            out.flush()
            step += stride
    except (BrokenPipeError, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()
