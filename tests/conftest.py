import os
import sys

# Tests import `parity` (this folder) and `unclip_jax` (the repo root) without installing either.
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch):
    """A folder that tempfile.mkdtemp & co. use for the test (tfds makes temp folders of its own)."""
    folder = tmp_path / "tempdir"
    folder.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(folder))
    return folder
