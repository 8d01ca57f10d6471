"""The talk page the gateway serves at `/`, driven in headless Chromium by Playwright.

Chromium comes from Debian (`apt-get install -y chromium`, as .ci/run does); Playwright only drives
it through `executable_path` (its own browser download needs a host CI does not reach). The
microphone is faked from a WAV: examples/question.wav, then silence, looped by Chromium. The graph
is graphs/serve.yaml on tiny demo weights, so the answer is not speech: the test asserts that
answer audio played in the page and that the transcript appeared.

Set OMNIFLOW_SCREENSHOT=docs/web.png to keep a screenshot of the page after the answer.
"""
from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

CHROMIUM = os.environ.get("OMNIFLOW_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required"]


def chromium() -> str:
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if not path:
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (Playwright's own browser download "
                    "is not used)")
    return path


def wait_for(page, condition: str, timeout: float) -> None:
    """page.wait_for_function, failing with the page's stats (what did happen) instead of a bare timeout."""
    try:
        page.wait_for_function(condition, timeout=timeout)
    except Exception as e:                                  # playwright's TimeoutError
        stats = page.evaluate("() => JSON.stringify(window.omniflowStats || null)")
        raise AssertionError(f"the page never reached {condition}: {type(e).__name__}; stats: {stats}") from None


def fake_mic(tmp: Path) -> Path:
    """The question, then 6 s of silence (the page answers before Chromium loops the file), at 48 kHz."""
    import soxr
    from test_gateway import QUESTION
    audio, rate = sf.read(QUESTION, dtype="float32", always_2d=True)
    audio = soxr.resample(audio.mean(axis=1), rate, 48000)
    path = tmp / "mic.wav"
    sf.write(path, np.concatenate([audio, np.zeros(6 * 48000, np.float32)]), 48000, subtype="PCM_16")
    return path


def test_page_is_served_and_unknown_paths_are_404(tmp_path):
    pytest.importorskip("websockets")
    from nodes.gateway import Gateway
    node = Gateway({"port": 0})
    node.setup()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
            html = r.read().decode()
        assert "/v1/realtime" in html and "audioWorklet" in html
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{node.port}/nothing")
        assert e.value.code == 404 and "/v1/realtime" in e.value.read().decode()
    finally:
        node.teardown()


def test_browser_hands_free_hears_the_answer_and_shows_the_transcript(demo_home, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the driver only)")
    executable = chromium()
    from test_gateway import free_port, run_server, serve_graph
    from test_realtime import wait_listening

    port = free_port()
    graph = serve_graph(tmp_path, port)
    graph.nodes["gateway"].params["idle_timeout_s"] = 10.0
    graph.nodes["backbone"].params["max_speed"] = 1.0      # answers arrive as they play: one can be cut mid-way
    mic = fake_mic(tmp_path)

    def browse():
        wait_listening(port)
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, headless=True,
                                         args=[*FLAGS, f"--use-file-for-fake-audio-capture={mic}"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/")
                page.click("#connect")
                wait_for(page, "() => window.omniflowStats.samplesPlayed > 0 && "
                                       "window.omniflowStats.transcript.length > 0", timeout=150_000)
                wait_for(page, "() => window.omniflowStats.turns > 0", timeout=60_000)
                result = page.evaluate("() => JSON.parse(JSON.stringify(window.omniflowStats))")
                # barge in over the next answer (typed: the fake microphone cannot be made to speak on
                # cue; a spoken barge-in takes the same stopPlayback path at speech_started)
                page.fill("#text", "What is the capital of France?")
                page.click("#send")
                wait_for(page, "() => window.omniflowStats.turns > 1", timeout=150_000)
                wait_for(page, "() => window.omniflowStats.answering && window.omniflowStats.samplesQueued > "
                         "window.omniflowStats.samplesPlayed + window.omniflowStats.samplesCut", timeout=60_000)
                page.fill("#text", "And of Italy?")
                page.click("#send")
                wait_for(page, "() => window.omniflowStats.stops > 0 && window.omniflowStats.cancelled > 0"
                                       " && window.omniflowStats.samplesCut > 0", timeout=30_000)
                wait_for(page, "() => window.omniflowStats.turns > 2", timeout=150_000)
                barge = page.evaluate("() => JSON.parse(JSON.stringify(window.omniflowStats))")
                # press to talk: hold the button over a whole loop of the fake microphone (question + silence)
                page.select_option("#mode", "press-to-talk")
                wait_for(page, "() => !document.getElementById('talk').disabled", timeout=10_000)
                page.hover("#talk")
                page.mouse.down()
                page.wait_for_timeout(10_000)
                page.mouse.up()
                wait_for(page, "() => window.omniflowStats.answered.press > 0", timeout=150_000)
                held = page.evaluate("() => JSON.parse(JSON.stringify(window.omniflowStats))")
                result["shown"] = page.inner_text("#transcript")
                result["labels"] = page.locator(".lat").all_inner_texts()      # first-audio latency per answer
                shot = os.environ.get("OMNIFLOW_SCREENSHOT")
                if shot:
                    page.screenshot(path=shot, full_page=True)
                page.click("#connect")                           # disconnect: the graph ends by itself
            finally:
                browser.close()
            return result, barge, held

    stats, barge, held = run_server(graph, browse, in_process=True)
    assert stats["events"].get("input_audio_buffer.speech_started", 0) >= 1
    assert stats["events"].get("response.output_audio.delta", 0) >= 1
    assert stats["samplesPlayed"] > 0 and stats["turns"] >= 1
    assert len(stats["latencies"]) >= 1 and all(ms > 0 for ms in stats["latencies"])
    assert stats["transcript"] and stats["transcript"][:20] in stats["shown"]
    assert stats["labels"] and all(label.startswith("first audio ") for label in stats["labels"])
    # typed, then typed over that answer while it played: its playback stopped and it was cancelled
    assert barge["stops"] >= 1 and barge["samplesCut"] > 0 and barge["cancelled"] >= 1
    assert barge["turns"] >= 3
    # press to talk (turn_detection null): the held audio was committed and answered
    assert held["answered"].get("press", 0) >= 1, held["answered"]
    assert barge["answered"].get("typed", 0) >= 1 and stats["answered"].get("voice", 0) >= 1
