"""A structural lint of an ONNX model against what TensorRT's ONNX parser accepts.

TensorRT cannot run here, so the ``trt`` export profile is checked for the things
that would make ``trt.OnnxParser`` or the engine build fail on a GPU machine:

- every standard-domain op is one the parser imports (``TRT_ONNX_OPS`` below);
- no ONNX local functions (the exporter must inline them);
- every ``TokenGather`` / ``TokenScatter`` node carries the string attributes
  ``plugin_namespace="irc"`` and ``plugin_version="1"`` (the parser maps a node to a
  plugin by ``op_type`` = plugin name plus these attributes; the domain is ignored);
- no other custom-domain op (nothing else has a plugin);
- every ``TopK`` has ``k <= 3840`` (TensorRT's limit) over the declared sequence range,
  and ``sorted=1``;
- ``NonZero`` gets a float input (the parser lists FP32/FP16 only for it);
- every ``If`` (TensorRT's ``IIfConditional``) has a BOOL condition of static shape with
  one element (the parser reshapes it to the 0-D predicate ``setCondition`` takes), two
  branches with as many outputs, and per output the same element type (one of those a
  conditional carries: FP32, FP16, BF16, INT32, INT64, BOOL) and, unless the condition is
  a build-time constant (the parser then imports the taken branch only), the same rank
  and two different tensor names.

Nodes inside ``If`` branches (and ``Loop`` / ``Scan`` bodies) get the same checks; a
problem there names its path, e.g. ``unit3 (If) > then_branch > mlp_gate (MatMul): ...``.

TopK's k is bounded by a small interpreter over the integer ops that feed it
(constants, ``Shape``, ``Gather``, ``Slice``, ``Concat``, arithmetic). A symbolic dim at
axis 1 of a 2-D graph input (``input_ids [batch, seq]``) counts as the sequence length,
bounded by ``max_seq``; dim expressions such as ``ceil(0.5*seq)`` are evaluated at
``max_seq`` (the shape expressions routing produces grow with T). Anything else that
the interpreter cannot bound (the batch size, a data-dependent value) makes k
*unknown*, which is reported: the lint is conservative.

Source of the op list: onnx/onnx-tensorrt ``docs/operators.md`` for TensorRT 10.15
(opset 9–24), the rows marked ``Y``. That page says TopK's "K input must be less than
3840"; TensorRT's ITopKLayer documents 3840 as the maximum; this lint allows ``k = 3840``.
``If``: the same page's row ("the two conditional branches must have the same rank and
must have different names"), the If importer of onnx-tensorrt (``onnxOpImporters.cpp``:
constant conditions parse one branch, others go through ``convertToScalar``, which needs
a static volume of 1) and TensorRT's operator page for ``If`` ("ranks must be equal
unless the condition is a build-time constant").
"""

from __future__ import annotations

import ast
import math

import onnx
from onnx import numpy_helper

__all__ = ["TOPK_MAX_K", "TRT_ONNX_OPS", "PLUGIN_OPS", "lint_for_tensorrt"]

TOPK_MAX_K = 3840
OPSET_RANGE = (9, 24)
PLUGIN_NAMESPACE = "irc"
PLUGIN_VERSION = "1"
PLUGIN_OPS = {"TokenGather": 2, "TokenScatter": 3}  # op_type -> number of inputs

# onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15): every operator marked "Y".
TRT_ONNX_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant
ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow
HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod
Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

_STANDARD_DOMAINS = ("", "ai.onnx")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
_T = onnx.TensorProto
# the types onnx-tensorrt lists for If (docs/operators.md)
_IF_TYPES = (_T.FLOAT, _T.FLOAT16, _T.BFLOAT16, _T.INT32, _T.INT64, _T.BOOL)


def lint_for_tensorrt(model: onnx.ModelProto, *, max_seq: int) -> list[str]:
    """Return the problems TensorRT would have with ``model`` (empty list = clean).

    Each string names the node (``name (op_type)``) and the problem. ``max_seq`` is the
    largest sequence length the engine will be built for.
    """
    if max_seq < 1:
        raise ValueError(f"max_seq must be positive, got {max_seq}")
    problems: list[str] = []
    for f in model.functions:
        problems.append(f"function {f.domain}::{f.name}: ONNX local functions are not supported by "
                        "the TensorRT parser here; inline them before export")
    opset = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), None)
    if opset is not None and not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"model: opset {opset} is outside TensorRT's {OPSET_RANGE[0]}–{OPSET_RANGE[1]}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model the checker rejects still gets the structural checks
        inferred = model
    bounds = _Bounds(inferred.graph, _seq_symbols(model.graph), max_seq)
    for path, node in _all_nodes(inferred.graph):
        problems.extend(_check_node(node, path + _label(node), bounds, max_seq))
    return problems


def _label(node: onnx.NodeProto) -> str:
    return f"{node.name or '<unnamed>'} ({node.domain + '::' if node.domain else ''}{node.op_type})"


def _subgraphs(node: onnx.NodeProto):
    """(attribute name, graph) of a node's bodies: If branches (then first), Loop / Scan bodies."""
    for attr in sorted(node.attribute, key=lambda a: a.name != "then_branch"):  # helper sorts by name
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            yield attr.name, sub


def _all_nodes(graph: onnx.GraphProto, path: str = ""):
    """(path, node) for every node, nested bodies included; path is ``"outer (If) > then_branch > "``."""
    for node in graph.node:
        yield path, node
        for attr_name, sub in _subgraphs(node):
            yield from _all_nodes(sub, f"{path}{_label(node)} > {attr_name} > ")


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for _, node in _all_nodes(graph):
        for _, sub in _subgraphs(node):
            yield sub


def _check_node(node: onnx.NodeProto, where: str, bounds: _Bounds, max_seq: int) -> list[str]:
    if node.op_type in PLUGIN_OPS:
        return _check_plugin_node(node, where)
    if node.domain not in _STANDARD_DOMAINS:
        return [f"{where}: custom-domain op with no TensorRT plugin (only "
                f"{', '.join(PLUGIN_OPS)} have one)"]
    if node.op_type not in TRT_ONNX_OPS:
        return [f"{where}: op not supported by TensorRT's ONNX parser"]
    if node.op_type == "TopK":
        return _check_topk(node, where, bounds, max_seq)
    if node.op_type == "If":
        return _check_if(node, where, bounds)
    if node.op_type == "NonZero":
        elem = bounds.elem_type(node.input[0])
        if elem is not None and elem not in _FLOAT_TYPES:
            name = onnx.TensorProto.DataType.Name(elem)
            return [f"{where}: TensorRT's NonZero takes FP32/FP16 input, got {name}; Cast the mask first"]
    return []


def _check_plugin_node(node: onnx.NodeProto, where: str) -> list[str]:
    problems = []
    attrs = {a.name: a for a in node.attribute}
    for key, want in (("plugin_namespace", PLUGIN_NAMESPACE), ("plugin_version", PLUGIN_VERSION)):
        a = attrs.get(key)
        if a is None:
            problems.append(f"{where}: missing string attribute {key}={want!r} (TensorRT maps the node "
                            "to a plugin by it)")
        elif a.type != onnx.AttributeProto.STRING or a.s.decode() != want:
            problems.append(f"{where}: attribute {key} must be the string {want!r}, got "
                            f"{onnx.helper.get_attribute_value(a)!r}")
    if len(node.input) != PLUGIN_OPS[node.op_type]:
        problems.append(f"{where}: expects {PLUGIN_OPS[node.op_type]} inputs, has {len(node.input)}")
    return problems


def _check_topk(node: onnx.NodeProto, where: str, bounds: _Bounds, max_seq: int) -> list[str]:
    problems = []
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("sorted", 1) != 1:
        problems.append(f"{where}: TensorRT's TopK needs sorted=1")
    if len(node.input) < 2:
        return problems + [f"{where}: TopK without a k input (opset < 10) is not handled; export opset >= 10"]
    values = bounds.of(node.input[1])
    if values is None or any(v is None for v in values):
        problems.append(f"{where}: cannot bound k (from {node.input[1]!r}) by the sequence length; "
                        f"TensorRT needs k <= {TOPK_MAX_K} and this lint cannot prove it (conservative)")
    elif max(values) > TOPK_MAX_K:
        problems.append(f"{where}: k can reach {max(values)} at max_seq={max_seq}, over TensorRT's TopK "
                        f"limit of {TOPK_MAX_K}; build for --max-seq {TOPK_MAX_K} or less")
    return problems


def _check_if(node: onnx.NodeProto, where: str, bounds: _Bounds) -> list[str]:
    """TensorRT's IIfConditional: a 0-D BOOL predicate and per output one rank and type."""
    problems = []
    cond = node.input[0]
    elem = bounds.elem_type(cond)
    if elem is not None and elem != _T.BOOL:
        problems.append(f"{where}: the condition {cond!r} is {_T.DataType.Name(elem)}; TensorRT's "
                        "IIfConditional takes a BOOL scalar: compare or Cast it to bool first")
    dims = bounds.static_dims(cond)
    if dims is not None and (None in dims or math.prod(dims) != 1):
        shape = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
        problems.append(f"{where}: the condition {cond!r} has shape {shape}; TensorRT needs a scalar or a "
                        "tensor of static shape with one element (it is reshaped to the 0-D predicate)")
    branches = dict(_subgraphs(node))
    then, other = branches.get("then_branch"), branches.get("else_branch")
    if then is None or other is None:
        return problems + [f"{where}: needs both then_branch and else_branch"]
    if len(then.output) != len(other.output):
        return problems + [f"{where}: then_branch has {len(then.output)} outputs, else_branch "
                           f"{len(other.output)}; TensorRT pairs them one to one"]
    constant = bounds.is_const(cond)  # the parser then imports the taken branch only
    for i, (t, e) in enumerate(zip(then.output, other.output, strict=True)):
        out = f"{where}: output {i}"
        if not constant and t.name == e.name:
            problems.append(f"{out} is the tensor {t.name!r} in both branches; TensorRT's parser needs "
                            "two different names (add an Identity in one branch)")
        types = [bounds.elem_type(t.name) or t.type.tensor_type.elem_type or None,
                 bounds.elem_type(e.name) or e.type.tensor_type.elem_type or None]
        if None not in types and types[0] != types[1]:
            names = " vs ".join(_T.DataType.Name(x) for x in types)
            problems.append(f"{out} has different element types in the branches ({names})")
        elif types[0] is not None and types[0] not in _IF_TYPES:
            problems.append(f"{out} is {_T.DataType.Name(types[0])}; TensorRT's If carries "
                            f"{', '.join(_T.DataType.Name(x) for x in _IF_TYPES)} only")
        ranks = [bounds.rank(t.name, t), bounds.rank(e.name, e)]
        if not constant and None not in ranks and ranks[0] != ranks[1]:
            problems.append(f"{out} has rank {ranks[0]} in then_branch and {ranks[1]} in else_branch; "
                            "TensorRT's IIfConditional needs equal ranks (broadcast or reshape one branch)")
    return problems


def _seq_symbols(graph: onnx.GraphProto) -> set[str]:
    """Symbolic dims at axis 1 of 2-D graph inputs: the sequence axis of [batch, seq]."""
    names = set()
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].dim_param.isidentifier():
            names.add(dims[1].dim_param)
    return names


class _Bounds:
    """Upper bounds of small integer tensors (as flat lists; ``None`` = unknown element)."""

    def __init__(self, graph: onnx.GraphProto, seq_symbols: set[str], max_seq: int):
        self.seq = {s: max_seq for s in seq_symbols}
        self.producer = {}
        self.values: dict[str, onnx.ValueInfoProto] = {}
        self.consts: dict[str, list] = {}
        self.const_dims: dict[str, list[int]] = {}
        # ONNX names are unique across nested graphs (no shadowing), so one table serves all
        for g in _all_graphs(graph):
            for init in g.initializer:
                self.const_dims[init.name] = list(init.dims)
                if init.data_location != onnx.TensorProto.EXTERNAL:
                    self.consts[init.name] = numpy_helper.to_array(init).reshape(-1).tolist()
            for v in [*g.input, *g.value_info, *g.output]:
                known = self.values.get(v.name)  # keep the better-typed declaration
                if known is None or _info(v) > _info(known):
                    self.values[v.name] = v
        for _, node in _all_nodes(graph):
            for out in node.output:
                self.producer[out] = node
        self.cache: dict[str, list | None] = {}

    def elem_type(self, name: str) -> int | None:
        v = self.values.get(name)
        return v.type.tensor_type.elem_type if v is not None and v.type.tensor_type.elem_type else None

    def dims(self, name: str) -> list | None:
        v = self.values.get(name)
        if v is None or not v.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else self._symbol(d.dim_param)
                for d in v.type.tensor_type.shape.dim]

    def static_dims(self, name: str) -> list | None:
        """The build-time dims (``None`` for a symbolic one); ``None`` if the shape is unknown."""
        if name in self.const_dims:
            return self.const_dims[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            return list(value.t.dims) if value is not None else None
        v = self.values.get(name)
        if v is None or not v.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]

    def rank(self, name: str, declared: onnx.ValueInfoProto) -> int | None:
        dims = self.static_dims(name)
        if dims is None and declared.type.tensor_type.HasField("shape"):
            return len(declared.type.tensor_type.shape.dim)
        return None if dims is None else len(dims)

    def _symbol(self, expr: str) -> int | None:
        """Evaluate a dim expression over the sequence symbols; None if it has others."""
        if not expr:
            return None
        if expr in self.seq:
            return self.seq[expr]
        try:
            value = _eval_dim(ast.parse(expr, mode="eval").body, self.seq)
            return math.ceil(value)
        except (SyntaxError, ValueError, KeyError, TypeError, ZeroDivisionError):
            return None

    def of(self, name: str) -> list | None:
        if name not in self.cache:
            self.cache[name] = None  # cycles (loop bodies) stay unknown
            self.cache[name] = self._compute(name)
        return self.cache[name]

    def _compute(self, name: str) -> list | None:
        if name in self.consts:
            return self.consts[name]
        node = self.producer.get(name)
        if node is None:
            return None
        op, attrs = node.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op == "Constant":
            if "value" in attrs:
                return numpy_helper.to_array(attrs["value"]).reshape(-1).tolist()
            return [attrs["value_int"]] if "value_int" in attrs else attrs.get("value_ints")
        if op == "Shape":
            dims = self.dims(node.input[0])
            return None if dims is None else dims[attrs.get("start", 0): attrs.get("end", len(dims))]
        args = [self.of(i) for i in node.input]
        if op in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Ceil", "Floor", "Abs"):
            return args[0]
        if op == "Concat":
            return None if any(a is None for a in args) else [v for a in args for v in a]
        if op == "Gather" and args[0] is not None and args[1] is not None:
            return [args[0][int(i)] if i is not None else None for i in args[1]]
        if op == "Slice" and args[0] is not None and all(a is not None for a in args[1:3]):
            return args[0][int(args[1][0]): int(args[2][0])]
        if op in ("Sub", "Div") and not self.is_const(node.input[1]):
            return None  # an upper bound of a - b or a / b needs b exactly
        if op in ("Add", "Mul", "Max", "Min", "Div", "Sub") and args[0] is not None and args[1] is not None:
            return _elementwise(op, args[0], args[1])
        return None

    def is_const(self, name: str) -> bool:
        node = self.producer.get(name)
        return name in self.const_dims or (node is not None and node.op_type == "Constant")


def _info(v: onnx.ValueInfoProto) -> int:
    """How much a declaration says: 0 nothing, 1 an element type, 2 a shape too."""
    t = v.type.tensor_type
    return (1 if t.elem_type else 0) + (1 if t.HasField("shape") else 0)


def _elementwise(op: str, a: list, b: list) -> list | None:
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    n = max(len(a), len(b))
    a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
    out = []
    for x, y in zip(a, b, strict=True):
        if op == "Min":  # one known bound is enough
            known = [v for v in (x, y) if v is not None]
            out.append(min(known) if known else None)
        elif x is None or y is None or (op == "Div" and y <= 0):
            out.append(None)
        else:
            out.append({"Add": x + y, "Mul": x * y, "Max": max(x, y), "Sub": x - y,
                        "Div": math.ceil(x / y)}[op])
    return out


# sympy's printing of torch's symbolic shapes (what torch.onnx writes as dim_param), e.g.
# "CeilToInt(0.5*ToFloat(s53))" for k = ceil(0.5·T)
_FUNCS = {"ceil": math.ceil, "floor": math.floor, "min": min, "max": max, "Min": min, "Max": max,
          "CeilToInt": math.ceil, "FloorToInt": math.floor, "TruncToInt": math.trunc, "ToFloat": float,
          "IntTrueDiv": lambda a, b: a / b, "FloorDiv": lambda a, b: a // b,
          "CeilDiv": lambda a, b: -(-a // b)}


def _eval_dim(node: ast.AST, env: dict[str, int]):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.BinOp):
        left, right = _eval_dim(node.left, env), _eval_dim(node.right, env)
        ops = {ast.Add: lambda: left + right, ast.Mult: lambda: left * right,
               ast.FloorDiv: lambda: left // right, ast.Div: lambda: left / right}
        if type(node.op) not in ops:  # Sub, Mod: not monotone bounds in general
            raise ValueError(f"unsupported operator in dim expression: {ast.dump(node.op)}")
        return ops[type(node.op)]()
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
        return _FUNCS[node.func.id](*[_eval_dim(a, env) for a in node.args])
    raise ValueError(f"unsupported dim expression node: {ast.dump(node)}")
