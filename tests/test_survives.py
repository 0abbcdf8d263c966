"""What irc survives: bad input, bad files and interruptions (issue 16).

Each test is one case a user may meet. What it must see: one line ``error: ...``
naming the file or flag, exit status 2, no traceback, no partial output, and no
code run from a file (or, for an oversize request, the documented clamp).
Numbers in the test names are the rows of issue 16's table.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest

import irc
from irc.cli import main
from irc.errors import UserError
from irc.train.convert import ConvertConfig, convert


def one_line_error(capsys, *needles: str) -> str:
    """The captured stderr ends in one ``error:`` line (progress lines may come before it), holding
    each of ``needles``, and holds no traceback."""
    captured = capsys.readouterr().err.strip()
    assert "Traceback" not in captured, captured
    err = captured.splitlines()[-1]
    assert err.startswith("error: "), captured
    assert sum(line.startswith("error: ") for line in captured.splitlines()) == 1, captured
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def must_not_load(monkeypatch):
    """Loading any model fails the test: the argument or file must be refused first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(irc, "load_model", refuse)
    monkeypatch.setattr("irc.models.load_model", refuse)
    monkeypatch.setattr("irc.routing.load_model", refuse)


@pytest.fixture
def model_copy(tiny_dirs, tmp_path) -> Path:
    """A private copy of the tiny llama directory, to damage."""
    return Path(shutil.copytree(tiny_dirs["llama"], tmp_path / "model"))


@pytest.fixture(scope="module")
def routed_dir(tiny_dirs, tmp_path_factory) -> Path:
    """A saved routed model (untrained routing) of the tiny llama."""
    out = tmp_path_factory.mktemp("routed") / "routed"
    irc.route(irc.load_model(str(tiny_dirs["llama"]), dtype="fp32")).save(out)
    return out


@pytest.fixture
def routed_copy(routed_dir, tmp_path) -> Path:
    return Path(shutil.copytree(routed_dir, tmp_path / "routed"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    words = "the cat dog sat ran over a red blue big house tree river city walked and then".split()
    root = tmp_path_factory.mktemp("corpus")
    for name, n in (("train", 80), ("heldout", 10)):
        docs = [" ".join(" ".join(rng.choice(words) for _ in range(8)).capitalize() + "." for _ in range(10))
                for _ in range(n)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


def _config(corpus: Path) -> ConvertConfig:
    return ConvertConfig(sparsity=0.5, dtype="fp32", lff_rank=8, n_sink=2, lff_seq_len=64, lff_windows=4,
                         init_windows=2, router_steps=4, batch_size=2, train_seq_len=32, calib_windows=2,
                         checkpoint_every=2, eval_seq_len=64, eval_tokens=256, fold_epsilon=None,
                         data=str(corpus / "train.jsonl"), eval_data=str(corpus / "heldout.jsonl"))


class _Stop(Exception):
    pass


@pytest.fixture
def interrupted_convert(tiny_dirs, corpus, tmp_path, monkeypatch):
    """A convert stopped after its lff stage (checkpoints in ``.out.irc-work``), and the CLI command that
    resumes it (the CLI gets the same configuration)."""
    out, config = tmp_path / "out", _config(corpus)

    def stop(name, info):
        if name == "lff":
            raise _Stop

    with pytest.raises(_Stop):
        convert(str(tiny_dirs["llama"]), out, config, show_progress=False, log=lambda s: None, on_stage=stop)
    monkeypatch.setattr(ConvertConfig, "from_preset", classmethod(lambda cls, *a, **k: config))
    work = tmp_path / ".out.irc-work"
    assert (work / "stage-lff.safetensors").is_file()
    return work, out, ["convert", str(tiny_dirs["llama"]), "-o", str(out), "--resume", "--json"]


class _Payload:
    """Unpickling this creates ``path``: the proof that a loader ran code from a file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


# 1 ------------------------------------------------------------------------------------------------
def test_01_a_crafted_checkpoint_runs_no_code_on_resume(interrupted_convert, tmp_path, capsys):
    work, out, resume = interrupted_convert
    ran = tmp_path / "code-ran"
    crafted = pickle.dumps(_Payload(ran))
    (work / "stage-lff.safetensors").write_bytes(crafted)
    (work / "stage-routers.pt").write_bytes(crafted)  # the old checkpoint name: never read
    assert main(resume) == 2
    one_line_error(capsys, "stage-lff.safetensors", "is corrupt", "run without --resume")
    assert not ran.exists()
    assert not out.exists()


def test_01_no_loader_can_unpickle():
    root = Path(irc.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for risky in ("weights_only=False", "pickle.load", "allow_pickle=True"):
            assert risky not in text, f"{path}: {risky}"


# 2 ------------------------------------------------------------------------------------------------
def test_02_a_relative_base_path_resolves_against_the_routed_directory(routed_dir, model_copy, tmp_path,
                                                                       monkeypatch):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    routed = Path(shutil.copytree(routed_dir, moved / "routed"))
    manifest = json.loads((routed / "irc.json").read_text())
    manifest["base"]["source"] = manifest["base"]["path"] = os.path.relpath(model_copy, routed)
    (routed / "irc.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(moved)  # from here the relative path names nothing
    assert irc.load(routed, dtype="fp32").base.directory == model_copy.resolve()


def test_02_the_base_hash_is_the_weights_not_a_marker_file(routed_dir, model_copy):
    real = irc.load_model(str(model_copy), dtype="fp32").weights_sha256
    (model_copy / "irc-source.json").write_text(json.dumps({"weights_sha256": "f" * 64}))
    assert irc.load_model(str(model_copy), dtype="fp32").weights_sha256 == real


# 3 ------------------------------------------------------------------------------------------------
def test_03_a_model_with_custom_code_is_refused_in_one_line(model_copy, tmp_path, capsys):
    (model_copy / "evil.py").write_text(f"open({str(tmp_path / 'code-ran')!r}, 'w')\n")
    config = json.loads((model_copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilForCausalLM", "AutoConfig": "evil.EvilConfig"}
    (model_copy / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(model_copy), "--data", "nowhere.txt"]) == 2
    one_line_error(capsys, "config.json", "does not run code shipped with a model")
    assert not (tmp_path / "code-ran").exists()


# 4 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, says", [("truncated", "truncated"), ("empty", "empty"),
                                          ("missing", "holds no weights")])
def test_04_bad_model_weights_are_one_line(model_copy, capsys, damage, says):
    weights = model_copy / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        weights.unlink()
    assert main(["eval", str(model_copy), "--data", "nowhere.txt"]) == 2
    one_line_error(capsys, str(model_copy), says)


# 5 ------------------------------------------------------------------------------------------------
def _damage_routed(routed: Path, damage: str) -> str:
    weights, manifest = routed / "routing.safetensors", routed / "irc.json"
    if damage == "weights truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "weights empty":
        weights.write_bytes(b"")
    elif damage == "weights missing":
        weights.unlink()
    elif damage == "manifest invalid":
        manifest.write_text('{"format": ')
    elif damage == "manifest a list":
        manifest.write_text("[]")
    elif damage == "manifest without base":
        m = json.loads(manifest.read_text())
        del m["base"]
        manifest.write_text(json.dumps(m))
    return "routing.safetensors" if damage.startswith("weights") else "irc.json"


@pytest.mark.parametrize("damage", ["weights truncated", "weights empty", "weights missing", "manifest invalid",
                                    "manifest a list", "manifest without base"])
def test_05_bad_routed_files_are_one_line_before_the_base_loads(routed_copy, capsys, must_not_load, damage):
    named = _damage_routed(routed_copy, damage)
    assert main(["eval", str(routed_copy), "--data", "nowhere.txt"]) == 2
    one_line_error(capsys, str(routed_copy / named))


# 6 ------------------------------------------------------------------------------------------------
def test_06_an_output_under_a_file_is_refused_before_any_work(tiny_dirs, tmp_path, capsys, must_not_load):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main(["convert", str(tiny_dirs["llama"]), "-o", str(a_file / "out"), "--sparsity", "0.5"]) == 2
    one_line_error(capsys, "is a file, not a directory")
    assert main(["inspect", str(tiny_dirs["llama"]), "--dot", str(a_file / "unit.svg")]) == 2
    one_line_error(capsys, "--dot", "is a file, not a directory")


def test_06_fold_and_bench_outputs_are_checked_before_any_work(routed_dir, tmp_path, capsys, must_not_load):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main(["fold", str(routed_dir), "-o", str(a_file / "folded")]) == 2
    one_line_error(capsys, "is a file, not a directory")
    assert main(["fold", str(routed_dir), "-o", str(tmp_path / "folded"), "--min-saving", "1.5"]) == 2
    one_line_error(capsys, "--min-saving must be in [0, 1)")
    assert not (tmp_path / "folded").exists()
    assert main(["bench", str(routed_dir), "--seq-lens", "8", "--out", str(a_file / "b")]) == 2
    one_line_error(capsys, "--out", "is a file, not a directory")


def test_06_a_read_only_output_directory_is_refused_before_any_work(tiny_dirs, tmp_path, capsys, must_not_load):
    import shutil
    import subprocess

    locked = tmp_path / "locked"
    locked.mkdir()
    # root writes into a 0555 directory, but not into an immutable one (chattr +i), the case
    immutable = os.geteuid() == 0
    if immutable:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)]).returncode != 0:
            pytest.skip("running as root, and chattr +i is not available on this filesystem")
    else:
        locked.chmod(0o555)
    try:
        assert main(["convert", str(tiny_dirs["llama"]), "-o", str(locked / "out"), "--sparsity", "0.5"]) == 2
        one_line_error(capsys, "is not writable")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)])
        else:
            locked.chmod(0o755)


# 7 ------------------------------------------------------------------------------------------------
def test_07_export_onnx_checks_its_output_first(routed_dir, tmp_path, capsys, must_not_load):
    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"keep me")
    assert main(["export", "onnx", str(routed_dir), "-o", str(existing)]) == 2
    one_line_error(capsys, "already exists", "--overwrite")
    assert existing.read_bytes() == b"keep me"
    assert main(["export", "onnx", str(routed_dir), "-o", str(existing / "m.onnx")]) == 2
    one_line_error(capsys, "is a file, not a directory")


# 8 ------------------------------------------------------------------------------------------------
def test_08_eval_refuses_windows_beyond_the_positions_of_a_base_model(tiny_dirs, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat " * 400)
    assert main(["eval", str(tiny_dirs["llama"]), "--data", str(text), "--seq-len", "600", "--max-tokens", "0",
                 "--dtype", "fp32"]) == 2
    one_line_error(capsys, "--seq-len 600", "512 positions")


# 9 ------------------------------------------------------------------------------------------------
@pytest.fixture
def short_model(model_copy) -> Path:
    """The tiny llama with 24 positions (rotary embeddings: the weights do not depend on it)."""
    config = json.loads((model_copy / "config.json").read_text())
    config["max_position_embeddings"] = 24
    (model_copy / "config.json").write_text(json.dumps(config))
    return model_copy


def test_09_generate_clamps_new_tokens_to_the_positions_left(short_model, capsys):
    assert main(["generate", str(short_model), "Paris is", "--max-new-tokens", "100000", "--dtype", "fp32",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["new_tokens"] <= 24 - result["prompt_tokens"]
    assert main(["generate", str(short_model), "Paris is", "--max-new-tokens", "100000", "--dtype", "fp32"]) == 0
    assert "clamped to" in capsys.readouterr().err


def test_09_generate_keeps_the_text_so_far_on_ctrl_c(short_model, capsys, monkeypatch):
    import irc.generation

    real = irc.generation.generate

    def interrupted(model, ids, *, config, on_token):
        def tick(step, tokens):
            on_token(step, tokens)
            if step == 3:
                raise KeyboardInterrupt

        return real(model, ids, config=config, on_token=tick)

    monkeypatch.setattr(irc.generation, "generate", interrupted)
    assert main(["generate", str(short_model), "Paris is", "--max-new-tokens", "10", "--dtype", "fp32"]) == 130
    captured = capsys.readouterr()
    assert captured.out.strip()  # the tokens generated before the interruption
    assert "interrupted after 4 new tokens" in captured.err


# 10 -----------------------------------------------------------------------------------------------
def test_10_sigterm_unwinds_like_ctrl_c(monkeypatch, capsys, tmp_path):
    from irc.cache import atomic_dir

    def killed(args):  # killed while writing a cache entry, as during a GGUF's dequantisation
        with atomic_dir(tmp_path / "entry") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr("irc.cli.convert.run", killed)
    assert main(["convert", "m", "-o", "o", "--sparsity", "0.5"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err  # says that the checkpoints are kept
    assert signal.getsignal(signal.SIGTERM) is before
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_10_stale_temporary_entries_are_swept(tmp_path):
    from irc.cache import STALE_SECONDS, sweep_stale

    old_dir, old_file, fresh = (tmp_path / ".m.tmp-a", tmp_path / ".h.txt.tmp-b", tmp_path / ".m.tmp-c")
    old_dir.mkdir()
    (old_dir / "model.safetensors").write_bytes(b"x" * 100)
    old_file.write_text("x")
    fresh.mkdir()
    long_ago = time.time() - STALE_SECONDS - 60
    for p in (old_dir, old_file):
        os.utime(p, (long_ago, long_ago))
    assert sorted(sweep_stale(tmp_path)) == sorted([old_dir, old_file])
    assert fresh.is_dir() and not old_dir.exists() and not old_file.exists()


# 11 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["stage-lff.safetensors", "stage-lff.json", "stage-plan.json", "run.json"])
def test_11_a_truncated_checkpoint_is_one_line(interrupted_convert, capsys, name):
    work, out, resume = interrupted_convert
    path = work / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(resume) == 2
    one_line_error(capsys, f"checkpoint {path} is corrupt", "run without --resume")
    assert not out.exists()


# smaller ones -------------------------------------------------------------------------------------
def test_arguments_are_checked_before_loading_anything(routed_dir, capsys, must_not_load):
    assert main(["eval", str(routed_dir), "--sparsity", "1.5"]) == 2
    one_line_error(capsys, "--sparsity must be in [0, 1), got 1.5")
    assert main(["generate", str(routed_dir), ""]) == 2
    one_line_error(capsys, "the prompt is empty")
    assert main(["generate", str(routed_dir), "Paris", "--max-new-tokens", "0"]) == 2
    one_line_error(capsys, "--max-new-tokens must be positive")


def test_written_files_respect_the_umask(tmp_path, routed_dir):
    from irc.cache import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    finally:
        os.umask(old)
    for name in ("routing.safetensors", "irc.json"):
        assert stat.S_IMODE((routed_dir / name).stat().st_mode) & 0o044 == 0o044, name


def test_a_user_error_is_raised_not_a_bug(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(UserError, match="model.safetensors"):
        irc.load_model(str(model_copy))


def test_an_untrustworthy_eval_warns(tiny_dirs, routed_copy, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 20)
    assert main(["eval", str(tiny_dirs["llama"]), "--data", str(text), "--seq-len", "16", "--dtype", "fp32"]) == 0
    assert "warning: only" in capsys.readouterr().err
    args = ["eval", str(routed_copy), "--data", str(text), "--seq-len", "16", "--dtype", "fp32", "--json"]
    assert main(args) == 0
    achieved = json.loads(capsys.readouterr().out)["sparsity"]["overall"]
    manifest = json.loads((routed_copy / "irc.json").read_text())
    manifest["training"] = {"sparsity": achieved + 0.3 if achieved < 0.5 else achieved - 0.3}
    (routed_copy / "irc.json").write_text(json.dumps(manifest))
    assert main(args) == 0
    assert "far from the" in capsys.readouterr().err


def test_resume_keeps_the_records_and_times_of_the_stages_before(interrupted_convert, capsys):
    work, out, resume = interrupted_convert
    lff = json.loads((work / "stage-lff.json").read_text())
    assert main(resume) == 0
    training = json.loads((out / "irc.json").read_text())["training"]
    assert training["lff"] == lff["record"]
    assert training["seconds"]["lff"] == lff["seconds"]
    assert "router_init" in training and {"plan", "lff", "init", "routers"} <= set(training["seconds"])
    assert not work.exists()
