"""Text in and out.

    prompt: {use: nodes.text:TextSource, params: {text: "What is the capital of France?"}}
    detok:  {use: nodes.text:Detokenizer, inputs: {tokens: backbone/tokens}}        # tokens -> text pieces
    print:  {use: nodes.text:TextSink, params: {mode: print}, inputs: {tokens: backbone/tokens}}
    log:    {use: nodes.text:TextSink, params: {mode: jsonl, path: out/answers.jsonl}, inputs: {text: detok/text}}

`TextSource` sends prompts: each line of `text` (or of the file at `path`) is one session, or with
`per_line: turn` one turn of a single session. `Detokenizer` turns the backbone's per-step tokens
into streamed text pieces with the checkpoint's tokenizer (text id = index 7 of each step, cut at
`_eot`, specials dropped, multi-byte characters never split). `TextSink` prints, appends to a file
or writes JSON lines with timestamps; it takes ready text (`text`) or tokens (`tokens`).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal

import msgspec

from omniflow.model import weights
from omniflow.frame import Frame
from omniflow.model.tokens import TEXT_STREAM
from omniflow.node import Node
from omniflow.turns import ask_turn

GRANT_POLL_S = 0.002       # a line waiting for its turn number checks this often


class TextSource(Node):
    outputs = {"text": "text"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        text: str | None = None            # the prompt(s): one per line
        path: str | None = None            # or a UTF-8 file with one prompt per line
        session: str = "default"           # session name; several lines: <session>-<line number>
        per_line: Literal["session", "turn"] = "session"
        turn_interval_s: float = 0.0       # per_line: turn -- wait this long before each next turn

    def setup(self) -> None:
        p = self.params
        if (p.text is None) == (p.path is None):
            raise ValueError("TextSource needs exactly one of params.text (the prompt) or params.path "
                             "(a file with one prompt per line)")
        if p.path is not None:
            path = Path(p.path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"prompt file not found: {path}. Fix: check params.path")
            raw = path.read_text(encoding="utf-8")
        else:
            raw = p.text
        self.lines = [line.strip() for line in raw.splitlines() if line.strip()]
        if not self.lines:
            raise ValueError("TextSource got no prompt: params.text / the file is empty")
        self.next = 0
        self.waiting: dict[str, int] = {}      # turn request ref -> line waiting for its turn

    def has_work(self) -> bool:
        return self.next < len(self.lines) or bool(self.waiting)

    def step(self):
        if self.waiting:                   # the bus has not granted the last line's turn yet
            time.sleep(GRANT_POLL_S)
            return
        i, p = self.next, self.params
        self.next += 1
        if p.per_line == "session":
            session = p.session if len(self.lines) == 1 else f"{p.session}-{i}"
        else:
            session = p.session
            if i > 0:
                time.sleep(p.turn_interval_s)
        ref, request = ask_turn(session, "text")       # every line is a new turn of its session
        self.waiting[ref] = i
        yield request

    def granted(self, session: str, turn: int, ref: str):
        i = self.waiting.pop(ref, None)
        if i is not None:
            frame = Frame(kind="text", session=session, turn=turn, seq=0, last=True,
                          meta={"text": self.lines[i]})
            yield "text", frame.stamp(self.name)


class _Detok:
    """Per-session streaming detokenizers over one tokenizer."""

    def __init__(self, checkpoint: str | None, log):
        from omniflow.model.tokenizer import Tokenizer

        # an explicit directory only needs tokenizer.json (Tokenizer.from_dir falls back to Qwen's
        # vocabulary without it); the cache must hold a whole Mini-Omni checkpoint
        path = weights.checkpoint_dir(checkpoint) if checkpoint else weights.resolve("miniomni")
        if not path.is_dir():
            raise weights.WeightsNotFound(f"tokenizer directory {path} does not exist: give the Mini-Omni "
                                          f"checkpoint directory, or leave checkpoint unset to use the cache")
        weights.warn_if_demo(path, log)
        self.tokenizer = Tokenizer.from_dir(path)
        self.streams: dict[str, object] = {}

    def push(self, frame: Frame) -> str:
        """One step's tokens (8,) -> the text it completes ('' while a character is incomplete)."""
        stream = self.streams.get(frame.session)
        if stream is None:
            stream = self.streams[frame.session] = self.tokenizer.stream()
        text = ""
        if frame.data is not None and len(frame.data):
            text = stream.push(int(frame.data[TEXT_STREAM]))
        if frame.last:
            text += stream.flush()
            del self.streams[frame.session]
        return text

    def reset(self, session: str) -> None:
        self.streams.pop(session, None)


class Detokenizer(Node):
    """tokens -> text: one "text" frame per step that completes text; the turn's last frame has last=True."""
    inputs = {"tokens": "tokens"}
    outputs = {"text": "text"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        checkpoint: str | None = None      # Mini-Omni dir holding tokenizer.json; None: the cache

    def setup(self) -> None:
        self.detok = _Detok(self.params.checkpoint, self.log)

    def process(self, port, frame: Frame):
        text = self.detok.push(frame)
        if text or frame.last:
            yield "text", frame.follow("text", meta={"text": text}, last=frame.last)

    def reset(self, session: str, turn: int):
        self.detok.reset(session)
        return ()


class TextSink(Node):
    """Write text: `print` (stdout, streamed), `file` (one line per finished turn), `jsonl` (timestamped pieces)."""
    inputs = {"text": "text", "tokens": "tokens"}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        mode: Literal["print", "file", "jsonl"] | None = None   # None: jsonl for *.jsonl, file for
        path: str | None = None            # another path, else print. "{session}" in path is replaced
        checkpoint: str | None = None      # tokenizer for the `tokens` input; None: the cache
        stream: bool = True                # print: show pieces as they come (else whole turns)

    def setup(self) -> None:
        p = self.params
        if p.mode is None:
            p.mode = "print" if not p.path else "jsonl" if p.path.endswith(".jsonl") else "file"
        if p.mode != "print" and not p.path:
            raise ValueError(f"TextSink mode {p.mode!r} needs params.path (e.g. out/{{session}}.txt)")
        self.detok = None
        self.turn_text: dict[str, list[str]] = {}
        self.open_line = False             # print: a streamed line waits for its newline

    def process(self, port, frame: Frame):
        if port == "tokens":
            if self.detok is None:         # loaded on first use: a text-only sink needs no checkpoint
                self.detok = _Detok(self.params.checkpoint, self.log)
            piece = self.detok.push(frame)
        else:
            piece = str(frame.meta.get("text", ""))
        self._write(frame, piece)
        return ()

    def reset(self, session: str, turn: int):
        if self.detok is not None:
            self.detok.reset(session)
        parts = self.turn_text.pop(session, None)
        if parts is not None:                     # a barge-in cut this answer short
            self._end_turn(session, "".join(parts), interrupted=True)
        return ()

    def finish(self):
        for session in list(self.turn_text):     # turns that never got their last frame
            self._end_turn(session, "".join(self.turn_text.pop(session)), interrupted=False)
        return ()

    # --- output -----------------------------------------------------------------------------
    def _write(self, frame: Frame, piece: str) -> None:
        p = self.params
        parts = self.turn_text.setdefault(frame.session, [])
        parts.append(piece)
        if p.mode == "print" and p.stream and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
            self.open_line = True
        elif p.mode == "jsonl" and piece:
            self._append(frame.session, {"time": time.time(), "session": frame.session,
                                         "turn": frame.turn, "seq": frame.seq, "text": piece})
        if frame.last:
            self._end_turn(frame.session, "".join(self.turn_text.pop(frame.session)), turn=frame.turn)

    def _end_turn(self, session: str, text: str, interrupted: bool = False, turn: int | None = None) -> None:
        p, mark = self.params, " [interrupted]" if interrupted else ""
        if p.mode == "print":
            if p.stream:
                if self.open_line or not interrupted:
                    sys.stdout.write(mark + "\n")
            elif text or not interrupted:
                sys.stdout.write(f"[{session}] {text}{mark}\n")
            sys.stdout.flush()
            self.open_line = False
        elif p.mode == "file":
            if text or not interrupted:
                self._append(session, text + mark)
        else:
            record = {"time": time.time(), "session": session, "end": True, "text": text}
            if turn is not None:
                record["turn"] = turn
            if interrupted:
                record["interrupted"] = True
            self._append(session, record)

    def _append(self, session: str, record) -> None:
        path = Path(self.params.path.replace("{session}", session)).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        line = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
