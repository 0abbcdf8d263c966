"""``irc run`` and ``irc bench`` on a tiny routed model: torch and ONNX Runtime agree."""

import json

import pytest
from routed_helpers import randomize_routing

import irc
from irc.cli import main
from irc.plan import RoutingPlan

TEXT = "Paris is the capital of France. Ada and Alan wrote numbers. " * 40


@pytest.fixture(scope="module")
def routed_dir(tiny_dirs, tmp_path_factory):
    routed = irc.route(irc.load_model(str(tiny_dirs["llama"]), dtype="fp32"), RoutingPlan(lff_rank=8, n_sink=2))
    randomize_routing(routed, seed=3)
    return routed.save(tmp_path_factory.mktemp("routed") / "tiny-routed")


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_run_torch_and_onnx_agree(routed_dir, tmp_path, capsys):
    assert main(["run", str(routed_dir), "Paris is the capital of", "--dtype", "fp32", "--json"]) == 0
    torch_run = _json(capsys)
    assert torch_run["backend"] == "torch" and len(torch_run["next_tokens"]) == 5
    assert torch_run["new_tokens"] > 0
    onnx = tmp_path / "m.onnx"
    assert main(["export", "onnx", str(routed_dir), "-o", str(onnx), "--routing", "threshold", "--json"]) == 0
    capsys.readouterr()
    assert main(["run", str(onnx), "Paris is the capital of", "--json"]) == 0
    onnx_run = _json(capsys)
    assert onnx_run["backend"] == "onnxruntime"
    assert onnx_run["continuation"] == torch_run["continuation"]  # same greedy tokens
    assert [c["id"] for c in onnx_run["next_tokens"]] == [c["id"] for c in torch_run["next_tokens"]]
    assert onnx_run["next_tokens"][0]["p"] == pytest.approx(torch_run["next_tokens"][0]["p"], abs=1e-4)


def test_run_rejects_an_empty_prompt(routed_dir, capsys):
    assert main(["run", str(routed_dir), ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_bench_reports_both_sides(routed_dir, text, tmp_path, backend, capsys):
    out = tmp_path / "bench"
    args = ["bench", str(routed_dir), "--backend", backend, "--seq-lens", "16,40", "--batch", "2",
            "--repeats", "2", "--warmup", "0", "--data", str(text), "--dtype", "fp32",
            "--onnx-dir", str(tmp_path / "onnx"), "--out", str(out), "--json"]
    assert main(args) == 0
    result = _json(capsys)
    assert result["backend"] == backend and [r["seq_len"] for r in result["rows"]] == [16, 40]
    for row in result["rows"]:
        assert row["dense_ms"] > 0 and row["routed_ms"] > 0
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["routed_ms"])
        assert row["speedup_pair_min"] <= row["speedup_pair_max"]
        assert 0 < row["execute_fraction"] < 1  # the random routers really split the tokens
        assert row["dense_peak_extra_mb"] >= 0 and row["routed_peak_extra_mb"] >= 0
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == result["rows"]
    assert "| 40 | 2 |" in out.with_suffix(".md").read_text()
    if backend == "ort":
        files = sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx"))
        assert files == ["dense.onnx", "threshold.onnx"]
        stamp = (tmp_path / "onnx" / "threshold.onnx").stat().st_mtime_ns
        assert main(args) == 0  # a second run reuses the exports
        capsys.readouterr()
        assert (tmp_path / "onnx" / "threshold.onnx").stat().st_mtime_ns == stamp


def test_bench_on_tensorrt_says_how_to_install(routed_dir, capsys):
    pytest.importorskip("irc.exporters.tensorrt")
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    assert main(["bench", str(routed_dir), "--backend", "trt", "--seq-lens", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'irc[trt]'" in err[0]


def test_bench_bad_arguments(routed_dir, capsys):
    assert main(["bench", str(routed_dir), "--seq-lens", "a,b"]) == 2
    assert "--seq-lens must be" in capsys.readouterr().err
    assert main(["bench", "no-such-dir", "--seq-lens", "8"]) == 2
    assert "not a routed model directory" in capsys.readouterr().err
