"""The default input: the pinned public sample is verified by SHA-256 and fetched once."""

import io
import shutil
import urllib.request

import pytest

from cemcurate import sample


@pytest.fixture
def fake_downloads(monkeypatch, data_root):
    # The sample is the ISBI-2012 training images; serve the real files from the data folder.
    calls = []

    def urlopen(url, timeout=None):
        calls.append(url)
        index = url.rsplit("/", 1)[1]
        return io.BytesIO((data_root / "isbi2012_unet/train/image" / index).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return calls


def test_sample_is_fetched_once_and_verified(tmp_path, fake_downloads):
    root = sample.fetch_sample(tmp_path / "cache")
    files = sorted((root / "isbi2012").glob("*.png"))
    assert len(files) == len(sample.SAMPLE_SHA256) == 30
    assert len(fake_downloads) == 30
    assert (root / "cemcurate.yaml").is_file()
    sample.fetch_sample(tmp_path / "cache")
    assert len(fake_downloads) == 30  # nothing downloaded again


def test_corrupt_download_is_rejected_and_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"not the file"))
    with pytest.raises(ValueError, match="checksum mismatch"):
        sample.fetch_sample(tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.png"))
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_default_input_prefers_cem_data(monkeypatch, data_root, tmp_path):
    # A folder other than ../shared/data (which is found without $CEM_DATA too), holding one real image.
    raw = tmp_path / "my_em"
    raw.mkdir()
    shutil.copy(data_root / "isbi2012_unet/train/image/0.png", raw / "0.png")
    monkeypatch.setenv("CEM_DATA", str(raw))
    found, sidecar = sample.default_input()
    assert found == raw and sidecar.name == "shared_data_sources.yaml"
    (raw / "cemcurate.yaml").write_text("- {path: '*.png'}\n")
    found, sidecar = sample.default_input()
    assert found == raw and sidecar is None  # the folder's own sidecar is found by the build
