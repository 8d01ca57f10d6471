"""Weight downloads with the network mocked: files requested, SHA-256 check, offline errors."""
import hashlib
import io
import urllib.error

import huggingface_hub
import pytest
import whisper
from huggingface_hub.errors import LocalEntryNotFoundError

from omniflow.model.weights import hub

PAYLOAD = b"pretend whisper checkpoint " * 1000
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


@pytest.fixture
def fake_whisper(monkeypatch):
    """A whisper model name whose URL embeds PAYLOAD's SHA-256; records every URL opened."""
    monkeypatch.setitem(whisper._MODELS, "unit", f"https://models.invalid/whisper/{SHA}/unit.pt")
    opened = []

    def serve(data):
        def urlopen(url, *a, **k):
            opened.append(url)
            return FakeResponse(data)
        monkeypatch.setattr(hub.urllib.request, "urlopen", urlopen)

    return serve, opened


def test_whisper_download_verified(fake_whisper, tmp_path):
    serve, opened = fake_whisper
    serve(PAYLOAD)
    path = hub.fetch_whisper("unit", tmp_path)
    assert path == tmp_path / "unit.pt" and path.read_bytes() == PAYLOAD
    assert opened == [f"https://models.invalid/whisper/{SHA}/unit.pt"]
    assert hub.fetch_whisper("unit", tmp_path) == path and len(opened) == 1   # cached: no second request


def test_whisper_sha_mismatch_removes_file(fake_whisper, tmp_path):
    serve, _ = fake_whisper
    serve(PAYLOAD + b"tampered")
    with pytest.raises(hub.DownloadError, match="SHA-256") as err:
        hub.fetch_whisper("unit", tmp_path)
    assert SHA in str(err.value)
    assert list(tmp_path.iterdir()) == []           # neither unit.pt nor unit.pt.part left behind


def test_whisper_corrupt_cached_file_is_replaced(fake_whisper, tmp_path):
    serve, opened = fake_whisper
    (tmp_path / "unit.pt").write_bytes(b"truncated")
    serve(PAYLOAD)
    assert hub.fetch_whisper("unit", tmp_path).read_bytes() == PAYLOAD
    assert len(opened) == 1


def test_whisper_offline_error_says_how_to_fix(monkeypatch, fake_whisper, tmp_path):
    def offline(url, *a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(hub.urllib.request, "urlopen", offline)
    with pytest.raises(hub.DownloadError) as err:
        hub.fetch_whisper("unit", tmp_path)
    msg = str(err.value)
    assert "HTTPS_PROXY" in msg and str(tmp_path / "unit.pt") in msg and SHA in msg
    assert not (tmp_path / "unit.pt").exists()


def test_whisper_real_table_and_unknown_name():
    assert hub.whisper_url("small").endswith(
        "/9ecf779972d90ba49c06d968637d720dd632c55bbf19d441fb42bf17a411e794/small.pt")
    with pytest.raises(ValueError, match="unknown whisper model 'smol'"):
        hub.fetch_whisper("smol")


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def snapshot_download(repo_id, *, local_dir, allow_patterns, revision=None, **kw):
        calls.append({"repo_id": repo_id, "allow_patterns": allow_patterns, "revision": revision})
        for name in allow_patterns:
            (local_dir / name).write_text(f"{repo_id}/{name}")
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_fetch_miniomni_requests_official_files(fake_hub, tmp_path):
    dest = hub.fetch_miniomni(tmp_path / "mo")
    assert fake_hub == [{"repo_id": "gpt-omni/mini-omni", "revision": None, "allow_patterns":
                         ["lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json"]}]
    assert (dest / "lit_model.pth").read_text() == "gpt-omni/mini-omni/lit_model.pth"
    hub.fetch_miniomni(tmp_path / "mo")
    assert len(fake_hub) == 1                       # everything present: no second request


def test_fetch_snac_requests_official_files(fake_hub, tmp_path):
    dest = hub.fetch_snac(tmp_path / "snac")
    assert fake_hub[0]["repo_id"] == "hubertsiuzdak/snac_24khz"
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "pytorch_model.bin"]


def test_hub_offline_error_says_how_to_fix(monkeypatch, tmp_path):
    def offline(*a, **k):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(hub.DownloadError) as err:
        hub.fetch_snac(tmp_path / "snac")
    msg = str(err.value)
    for needed in ("hubertsiuzdak/snac_24khz", "HF_ENDPOINT", "HTTPS_PROXY", "pytorch_model.bin",
                   str(tmp_path / "snac"), "ConnectError"):
        assert needed in msg


def test_hub_missing_required_file(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path))
    with pytest.raises(hub.DownloadError, match="has no lit_model.pth, model_config.yaml, tokenizer.json"):
        hub.fetch_miniomni(tmp_path / "empty", repo="someone/not-mini-omni")


def test_files_copied_by_hand_need_no_network(monkeypatch, tmp_path):
    def offline(*a, **k):
        raise LocalEntryNotFoundError("offline")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    for name in ("lit_model.pth", "model_config.yaml", "tokenizer.json"):   # no tokenizer_config.json
        (tmp_path / name).write_text("x")
    assert hub.fetch_miniomni(tmp_path) == tmp_path
