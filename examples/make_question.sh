#!/usr/bin/env bash
# Regenerates examples/question.wav: a spoken question for the speech-to-speech graph.
# Needs espeak-ng and sox (Debian/Ubuntu: apt-get install -y espeak-ng sox).
# Output: 16 kHz mono 16-bit WAV, with 0.3 s of silence before and 0.8 s after the speech so the
# VAD sees a clear start and end of speech.
set -euo pipefail
cd "$(dirname "$0")"
QUESTION="${1:-What is the capital of France?}"
tmp="$(mktemp --suffix=.wav)"
trap 'rm -f "$tmp"' EXIT
espeak-ng -v en-us -s 150 -w "$tmp" "$QUESTION"
sox "$tmp" -r 16000 -c 1 -b 16 question.wav pad 0.3 0.8
soxi question.wav
