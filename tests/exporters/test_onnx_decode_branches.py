"""ONNX decode export with ``If`` branches (``irc.nn.decode_branches``), against PyTorch and ORT's profiler.

A tiny llama with dynamic units (layer0_attn, layer1_mlp) and forecast-folded ones
(layer1_attn with a sink-slot cache, layer0_mlp): ORT generates PyTorch's tokens
on a batch-1 prompt and on a left-padded batch; with every threshold forced to
+inf (all non-sinks approximated) / -inf (all executed), ORT's profile of one
decode step past the sinks lists no node of the skipped branch: an approximated
token runs no node of its unit's execute branch (none of its MatMuls), and the
folded attention runs no sink-slot node. On a batch, each dynamic unit's gathered
branch (rows / tokens through NonZero) runs in ORT.
"""

import json
import math
import re

import numpy as np
import onnx
import pytest
import torch
from routed_helpers import tiny_routed

from irc.exporters.onnx_decode import FILE, STEP_FILE, OnnxDecodeConfig, OrtDecoder, export_decode
from irc.exporters.trt_lint import lint_for_tensorrt
from irc.generation import GenerationConfig, generate, left_pad
from irc.plan import RoutingPlan

N_SINK = 4
FOLDS = {"layer1_attn": "forecast", "layer0_mlp": "forecast"}  # layer0_attn, layer1_mlp route
QUIET = {"log": lambda _: None}


def _model(theta: float | None = None):
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=N_SINK))
    routed.fold(FOLDS)
    routed.set_routing("threshold")
    if theta is not None:
        for unit in routed.units.values():
            unit.threshold.fill_(theta)
    return routed


def _branches(graph: onnx.GraphProto) -> dict[str, onnx.GraphProto]:
    return {a.name: a.g for node in graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}


def _node_names(graph: onnx.GraphProto, ops: tuple[str, ...] = ()) -> set[str]:
    """Names of the nodes of ``graph`` and its branches (of op types ``ops`` only, if given)."""
    names = set()
    for node in graph.node:
        if not ops or node.op_type in ops:
            names.add(node.name)
        for sub in _branches(onnx.GraphProto(node=[node])).values():
            names |= _node_names(sub, ops)
    return names


def _top_level_ifs(model: onnx.ModelProto):
    """(routed, folded) top-level If nodes: a routed unit's execute branch nests the all/mixed If."""
    routed, folded = [], []
    for node in model.graph.node:
        if node.op_type == "If":
            then = next(a.g for a in node.attribute if a.name == "then_branch")
            (routed if any(n.op_type == "If" for n in then.node) else folded).append(node)
    return routed, folded


def test_branches_generate_torch_tokens(tmp_path):
    routed = _model()
    manifest = export_decode(routed, tmp_path, OnnxDecodeConfig(), **QUIET)
    assert manifest["config"]["branches"] and manifest["verification"]["passed"]
    model = onnx.load(str(tmp_path / FILE), load_external_data=False)
    dynamic, folded = _top_level_ifs(model)
    assert (len(dynamic), len(folded)) == (2, 2)
    ort_decoder = OrtDecoder(tmp_path)
    greedy = GenerationConfig(max_new_tokens=10, stop_at_eos=False)
    g = torch.Generator().manual_seed(5)
    one = torch.randint(3, 300, (1, 7), generator=g)
    rows = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (2, 9, 6)]  # row 0: 2 real < n_sink
    for ids, mask in [(one, torch.ones_like(one)), left_pad(rows, pad_id=2)]:
        want = generate(routed, ids, mask, greedy)
        assert generate(ort_decoder, ids, mask, greedy).tokens == want.tokens
        assert 0.0 < want.execute_fraction < 1.0  # the decisions went both ways
    # batch > 1: ORT ran each dynamic unit's gathered branch (NonZero over the executed tokens or rows)
    ort_decoder.session = _profiled_session(tmp_path / FILE, tmp_path, "batch")
    assert generate(ort_decoder, ids, mask, greedy).tokens == want.tokens
    ran = _ran(ort_decoder.session)
    _unique_names(model.graph, "")
    for node in _top_level_ifs(model)[0]:
        inner = next(n for n in _branches(onnx.GraphProto(node=[node]))["then_branch"].node if n.op_type == "If")
        assert _node_names(_branches(onnx.GraphProto(node=[inner]))["else_branch"], ("NonZero",)) & ran
    # TensorRT: the If nodes pass (bool scalar condition, equal ranks and types per output)
    problems = lint_for_tensorrt(model, max_seq=2048)
    assert not [p for p in problems if re.search(r"\(If\): ", p)], problems


def _profiled_session(path, tmp_path, name: str):
    """An ORT session of ``path`` with unique node names (path-prefixed) that profiles every node it runs."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    _unique_names(model.graph, "")
    unique = tmp_path / f"{name}.onnx"
    onnx.save(model, str(unique))
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / f"profile-{name}")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the node names
    return ort.InferenceSession(str(unique), options, providers=["CPUExecutionProvider"])


def _ran(session) -> set[str]:
    """Names of the nodes the session ran, from its profile."""
    events = json.loads(open(session.end_profiling()).read())
    return {e["name"].removesuffix("_kernel_time") for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}


def _profiled_step(path, tmp_path, batch: int, file: str = FILE) -> set[str]:
    """Names of the nodes ORT ran in one decode step after 6 real tokens per row (past the sinks),
    the step run by ``file`` (the general file, or the one-token step file at batch 1)."""
    decoder = OrtDecoder(path)
    ids = torch.randint(3, 300, (batch, 6), generator=torch.Generator().manual_seed(0))
    _, past = decoder.step(ids, torch.ones_like(ids), decoder.empty_cache(batch))
    session = _profiled_session(path.with_name(file), tmp_path, f"step{batch}-{file}")
    feeds = {"input_ids": np.full((batch, 1), 7, np.int64), "attention_mask": np.ones((batch, 7), np.int64)}
    feeds.update(zip(decoder.cache_names, past, strict=True))
    session.run(None, feeds)
    return _ran(session)


def _unique_names(graph: onnx.GraphProto, prefix: str) -> None:
    for i, node in enumerate(graph.node):
        node.name = f"{prefix}{i}_{node.name}"
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _unique_names(a.g, f"{node.name}/{a.name}/")


@pytest.mark.parametrize("theta", [math.inf, -math.inf])
def test_ort_runs_only_the_taken_branch(theta, tmp_path):
    export_decode(_model(theta), tmp_path / "decode", OnnxDecodeConfig(verify_tokens=2), **QUIET)
    model = onnx.load(str(tmp_path / "decode" / FILE), load_external_data=False)
    _unique_names(model.graph, "")
    dynamic, folded = _top_level_ifs(model)
    for batch in (1, 2):  # at B = 2 every row decides alike: all approximated (nothing runs) / all executed
        ran = _profiled_step(tmp_path / "decode" / FILE, tmp_path, batch)
        assert {n.name for n in dynamic + folded} <= ran  # every If ran (its condition evaluated)
        for node in dynamic:
            branches = _branches(onnx.GraphProto(node=[node]))
            execute, approximate = _node_names(branches["then_branch"]), _node_names(branches["else_branch"])
            matmuls = _node_names(branches["then_branch"], ("MatMul", "Gemm"))
            inner = next(n for n in branches["then_branch"].node if n.op_type == "If")
            gathered = _node_names(_branches(onnx.GraphProto(node=[inner]))["else_branch"])
            assert matmuls and gathered  # the unit's projections sit in the execute branch
            if theta == math.inf:  # approximated: the forecaster ran, none of the unit's nodes
                assert not execute & ran and approximate <= ran
            else:  # executed: the unit as captured, no gathers, no forecaster
                assert matmuls & ran and not gathered & ran and not approximate & ran
        for node in folded:  # no new sink: no sink-slot node, whatever the thresholds
            then = _node_names(_branches(onnx.GraphProto(node=[node]))["then_branch"])
            assert not then & ran


def _step_file_ifs(model: onnx.ModelProto):
    """(routed, folded) If nodes of the step file: a routed unit's else branch is its forecaster."""
    routed, folded = [], []
    for node in model.graph.node:
        if node.op_type == "If":
            approximate = _branches(onnx.GraphProto(node=[node]))["else_branch"]
            (routed if _node_names(approximate, ("MatMul", "Gemm")) else folded).append(node)
    return routed, folded


def test_step_file_branches_once_per_unit(tmp_path):
    """The one-token, batch-1 file: static [1, 1] tokens, one If per unit and nothing gathered; its
    step equals the general file's on the same feed, logits and decisions."""
    import onnxruntime as ort

    manifest = export_decode(_model(), tmp_path, OnnxDecodeConfig(step_file=True), **QUIET)
    assert manifest["step_file"] == STEP_FILE and manifest["verification"]["passed"]
    model = onnx.load(str(tmp_path / STEP_FILE), load_external_data=False)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 1]
    routed, folded = _step_file_ifs(model)
    assert (len(routed), len(folded)) == (2, 2)
    assert not _node_names(model.graph, ("NonZero",))  # nothing gathered
    for node in routed:  # no If inside a unit's branches (the general file nests all/mixed)
        assert not any(_node_names(b, ("If",)) for b in _branches(onnx.GraphProto(node=[node])).values())
    decoder = OrtDecoder(tmp_path)
    assert decoder.step_session is not None
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    _, past = decoder.step(ids, torch.ones_like(ids), decoder.empty_cache(1))
    feeds = {"input_ids": np.full((1, 1), 9, np.int64), "attention_mask": np.ones((1, 7), np.int64),
             **dict(zip(decoder.cache_names, past, strict=True))}
    general = ort.InferenceSession(str(tmp_path / FILE), providers=["CPUExecutionProvider"]).run(None, feeds)
    step = decoder.step_session.run(None, feeds)
    np.testing.assert_allclose(step[0], general[0], atol=1e-5, rtol=0)
    for a, b in zip(step[1:], general[1:], strict=True):  # present caches, then the decisions
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # without it, every step runs the general file, and a stale step file is not left behind
    export_decode(_model(), tmp_path, OnnxDecodeConfig(step_file=False), **QUIET)
    assert not (tmp_path / STEP_FILE).exists() and OrtDecoder(tmp_path).step_session is None


@pytest.mark.parametrize("theta", [math.inf, -math.inf])
def test_step_file_runs_only_the_taken_branch(theta, tmp_path):
    export_decode(_model(theta), tmp_path / "decode", OnnxDecodeConfig(verify_tokens=2, step_file=True), **QUIET)
    model = onnx.load(str(tmp_path / "decode" / STEP_FILE), load_external_data=False)
    _unique_names(model.graph, "")
    routed, folded = _step_file_ifs(model)
    ran = _profiled_step(tmp_path / "decode" / FILE, tmp_path, 1, STEP_FILE)
    assert {n.name for n in routed + folded} <= ran
    for node in routed:
        branches = _branches(onnx.GraphProto(node=[node]))
        execute, approximate = _node_names(branches["then_branch"]), _node_names(branches["else_branch"])
        assert _node_names(branches["then_branch"], ("MatMul", "Gemm", "FusedMatMul"))
        if theta == math.inf:
            assert not execute & ran and approximate <= ran
        else:
            assert execute <= ran and not approximate & ran
    for node in folded:
        assert not _node_names(_branches(onnx.GraphProto(node=[node]))["then_branch"]) & ran


def test_branch_free_export_stays_available(tmp_path):
    routed = _model()
    manifest = export_decode(routed, tmp_path, OnnxDecodeConfig(branches=False), **QUIET)
    assert manifest["verification"]["passed"] and not manifest["config"]["branches"]
    model = onnx.load(str(tmp_path / FILE), load_external_data=False)
    assert not [n for n in model.graph.node if n.op_type == "If"]
