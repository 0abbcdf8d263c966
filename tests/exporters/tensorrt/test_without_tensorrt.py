"""Every TensorRT entry point, with ``tensorrt`` absent, says in one line what to install."""

import importlib.util
import subprocess
import sys

import pytest

from irc.cli import main
from irc.errors import UserError
from irc.exporters.tensorrt import INSTALL_HINT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                reason="tensorrt is installed here; these check its absence")


def _one_line_hint(message: str) -> None:
    assert "\n" not in message.strip()
    assert INSTALL_HINT in message and "pip install 'irc[trt]'" in message and "NVIDIA GPU" in message


def test_importing_the_package_does_not_import_tensorrt():
    code = ("import sys, irc.exporters.tensorrt as t, irc.exporters.tensorrt.builder, "
            "irc.exporters.tensorrt.engine, irc.exporters.tensorrt.plugins, irc.exporters.tensorrt.shapes, "
            "irc.cli.export_trt, irc.cli.export, irc.cli.eval; print('tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("entry", ["register_plugins", "Engine", "build_engine"])
def test_api_entry_points_raise_the_install_hint(entry, tmp_path):
    import irc.exporters.tensorrt as trt_api

    calls = {
        "register_plugins": lambda: trt_api.register_plugins(),
        "Engine": lambda: trt_api.Engine(tmp_path / "model.engine"),
        "build_engine": lambda: trt_api.build_engine(tmp_path / "model.onnx", tmp_path / "model.engine"),
    }
    with pytest.raises(UserError) as info:
        calls[entry]()
    _one_line_hint(str(info.value))


@pytest.mark.parametrize("argv", [
    ["export", "trt", "model.onnx", "-o", "model.engine"],
    ["export", "trt", "model.onnx", "-o", "model.engine", "--min-seq", "8", "--opt-seq", "256", "--max-seq",
     "1024", "--max-batch", "4", "--timing-cache", "t.cache", "--workspace", "4"],
    ["eval", "model.engine"],
], ids=["export", "export-all-flags", "eval"])
def test_cli_entry_points_exit_non_zero_with_one_line(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    _one_line_hint(err)


def test_a_bad_profile_range_is_a_user_error_too():
    from irc.exporters.tensorrt.builder import EngineBuildConfig

    with pytest.raises(UserError, match="--min-seq <= --opt-seq <= --max-seq"):
        EngineBuildConfig(min_seq=64, opt_seq=32, max_seq=128)
    with pytest.raises(UserError, match="--workspace"):
        EngineBuildConfig(workspace_gb=0)
    assert EngineBuildConfig().to_dict()["max_seq"] == 2048
