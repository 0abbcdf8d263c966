"""The command line: exit codes, one-line errors, JSON output."""

import json
import subprocess
import sys

import pytest

from irc.cli import main


def _irc(*args, env=None):
    return subprocess.run([sys.executable, "-m", "irc", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    "model, message",
    [
        ("/no/such/model", "error: no such model: /no/such/model"),
        ("some-org/some-model", "error: 'some-org/some-model' looks like a Hugging Face Hub id"),
    ],
)
def test_bad_model_is_one_line_without_traceback(model, message):
    proc = _irc("eval", model)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message)
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_help_and_version():
    assert _irc("--help").returncode == 0
    proc = _irc("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("irc ")
    assert _irc().returncode == 2


def test_eval_json_on_a_tiny_model(tiny_dirs, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Paris is the capital of France. " * 20)
    code = main(["eval", str(tiny_dirs["llama"]), "--data", str(text), "--seq-len", "32",
                 "--dtype", "fp32", "--json", "--max-tokens", "0"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert result["perplexity"] > 1 and result["tokens"] > 0 and result["tokens_per_s"] > 0
    assert result["data"] == f"{text}:all" and len(result["weights_sha256"]) == 64


def test_eval_human_output_ends_with_a_verdict(tiny_dirs, tmp_path, capsys):
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "Ada and Alan wrote numbers like 12 and 345. " * 10}) + "\n")
    assert main(["eval", str(tiny_dirs["qwen2"]), "--data", str(text), "--seq-len", "16",
                 "--stride", "8", "--dtype", "fp32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("PASSED eval") and "ppl" in lines[-1]


def test_eval_bad_arguments(tiny_dirs, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("short text here")
    assert main(["eval", str(tiny_dirs["llama"]), "--data", str(text), "--seq-len", "8",
                 "--stride", "9"]) == 2
    assert "stride must be in [1, 8]" in capsys.readouterr().err
    assert main(["eval", str(tiny_dirs["llama"]), "--data", "nowhere.txt"]) == 2
    assert "no such corpus" in capsys.readouterr().err


def test_inspect_a_tiny_model(tiny_dirs, tmp_path, capsys):
    svg = tmp_path / "unit.svg"
    assert main(["inspect", str(tiny_dirs["llama"]), "--sparsity", "0.5", "--dtype", "fp32",
                 "--dot", str(svg), "--layer", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[-1].startswith("PASSED inspect") and "units=4" in lines[-1]
    assert sum(1 for line in lines if line.strip().startswith(("0  ", "1  ")) and " yes " in line) == 4
    assert "# --- layer1_attn.query ---" in out and "scaled_dot_product_attention" in out
    import xml.dom.minidom

    doc = xml.dom.minidom.parse(str(svg))
    labels = [t.firstChild.data for t in doc.getElementsByTagName("text") if t.firstChild]
    assert "scaled_dot_product_attention" in labels and "token_gather (executed)" in labels


def test_inspect_json_and_bad_sparsity(tiny_dirs, capsys):
    assert main(["inspect", str(tiny_dirs["qwen2"]), "--json", "--dtype", "fp32", "--variant", "skip"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["routed_units"] == 4 and result["plan"]["variant"] == "skip"
    assert result["flops_per_token"]["routed"] < result["flops_per_token"]["dense"]
    assert main(["inspect", str(tiny_dirs["qwen2"]), "--sparsity", "1.5"]) == 2
    assert "--sparsity must be in [0, 1)" in capsys.readouterr().err


def test_generate_on_a_tiny_model(tiny_dirs, capsys):
    assert main(["generate", str(tiny_dirs["llama"]), "Paris is the capital", "--max-new-tokens", "6",
                 "--dtype", "fp32", "--stream"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("PASSED generate") and "tokens/s" in out[-1] and "execute 1.000" in out[-1]
    assert any(line.startswith("FLOPs") for line in out)
    # 2 layers × keys and values × 2 KV heads × 16 × 4 B; nothing folded: as dense
    assert "KV cache    512 B/token (dense 512 B/token)" in out
    assert main(["generate", str(tiny_dirs["llama"]), "Paris", "--max-new-tokens", "4", "--dtype", "fp32",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["backend"] == "torch" and len(result["tokens"][0]) >= 1
    assert result["kv_cache_bytes"]["per_token"] == result["kv_cache_bytes"]["dense_per_token"] == 512
    assert result["step_gemm_aten_rows"] == 0  # fp32: oneDNN's setting never matters


def test_generate_names_the_step_kernels_in_bf16(tiny_dirs, capsys, monkeypatch):
    monkeypatch.setenv("IRC_DECODE_GEMM", "aten")
    assert main(["generate", str(tiny_dirs["llama"]), "Paris", "--max-new-tokens", "4", "--dtype", "bf16"]) == 0
    decode = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("decode "))
    assert "(torch, bf16, dense, static cache, ATen GEMM ≤ 4 rows)" in decode


def test_generate_chat_without_template_is_one_line(tiny_dirs):
    proc = _irc("generate", str(tiny_dirs["llama"]), "hi", "--chat", "--max-new-tokens", "2")
    assert proc.returncode == 2 and "no chat template" in proc.stderr and "Traceback" not in proc.stderr
