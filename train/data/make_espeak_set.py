"""Speak a small real speech set offline with espeak-ng: WAV files + transcripts + a manifest.

    python -m train.data.make_espeak_set out_dir [--count 36] [--voice en-us]

Writes `out_dir/wav/NNNN.wav` (espeak-ng's 22.05 kHz mono), a sidecar `NNNN.txt` transcript per
file (so `corpus:out_dir` reads it), and `out_dir/manifest.jsonl` with one sample per sentence and
task: ASR and TTS (T1A2) by default; with `--tasks` also "repeat after me" samples for the other
tasks (A1T2 and A1A2: the sentence's speech -> its text / its speech; T1T2: text -> same text), so
every stage has something to train on. Needs the espeak-ng program (apt-get install espeak-ng).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

# Short, varied sentences: a few dozen are enough to see losses fall and to test the data path.
SENTENCES = [
    "Hello there.", "Good morning.", "How are you today?", "I am fine, thank you.",
    "The sun is bright.", "It is raining again.", "Open the window please.", "Close the door.",
    "Where is the station?", "The train leaves at nine.", "I like green tea.", "Coffee is hot.",
    "The cat sleeps on the mat.", "A dog barks at night.", "Birds sing in the spring.",
    "We walk in the park.", "Read me a story.", "The book is on the table.", "Turn on the light.",
    "It is very cold outside.", "Let us go home.", "Call me tomorrow.", "What time is it?",
    "The music is too loud.", "Please speak slowly.", "Thank you very much.", "See you later.",
    "The sky is blue.", "Water is wet.", "Snow falls in winter.", "Apples are red.",
    "My name is Sam.", "This is a test.", "Count from one to five.", "The river runs fast.",
    "Stars shine at night.", "Bread and butter.", "The phone is ringing.", "Wash your hands.",
    "Today is a good day.",
]
ESPEAK = "espeak-ng"
# task -> manifest fields of one sentence's sample (audio path, text)
_SAMPLE = {
    "ASR": lambda wav, text: {"input_audio": wav, "target_text": text},
    "T1A2": lambda wav, text: {"input_text": text, "target_audio": wav},
    "A1T2": lambda wav, text: {"input_audio": wav, "target_text": text},
    "A1A2": lambda wav, text: {"input_audio": wav, "target_text": text, "target_audio": wav},
    "T1T2": lambda wav, text: {"input_text": text, "target_text": text},
}


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


def make_espeak_set(out_dir: str | Path, count: int = 36, *, voice: str = "en-us", speed_wpm: int = 160,
                    tasks: tuple[str, ...] = ("ASR", "T1A2")) -> Path:
    """Speak the first `count` sentences into `out_dir`; returns the manifest path."""
    unknown = set(tasks) - set(_SAMPLE)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; use some of {', '.join(_SAMPLE)}")
    if not espeak_available():
        raise FileNotFoundError(f"{ESPEAK} not found: install it (Debian/Ubuntu: apt-get install espeak-ng)")
    if not 1 <= count <= len(SENTENCES):
        raise ValueError(f"count must be in [1, {len(SENTENCES)}], got {count}")
    out = Path(out_dir)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, text in enumerate(SENTENCES[:count]):
        wav = out / "wav" / f"{i:04d}.wav"
        if not wav.exists():
            subprocess.run([ESPEAK, "-v", voice, "-s", str(speed_wpm), "-w", str(wav), text],
                           check=True, capture_output=True)
        wav.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
        rel = f"wav/{wav.name}"
        lines += [{"task": t, "id": f"{i:04d}:{t}", **_SAMPLE[t](rel, text)} for t in tasks]
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--count", type=int, default=36)
    p.add_argument("--voice", default="en-us")
    p.add_argument("--tasks", default="ASR,T1A2", help="comma-separated: ASR,T1A2,A1T2,A1A2,T1T2")
    args = p.parse_args(argv)
    print(make_espeak_set(args.out_dir, args.count, voice=args.voice, tasks=tuple(args.tasks.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
