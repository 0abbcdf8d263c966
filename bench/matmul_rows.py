"""What a unit's products cost for 1 to 8 rows: why routing a decode batch saves little on a CPU.

A decode step of B rows multiplies ``[B, D]`` by each weight once. Per-token routing
skips rows, so a unit's products run on the executed rows only (ONNX Runtime gathers them,
``NonZero``); that saves time only if a product over fewer rows is faster. This times the
products of SmolLM2-135M's units, for --rows rows each:

- torch bf16 (the decode step's ``F.linear``, oneDNN): q/o 576→576, k/v 576→192, gate/up
  576→1536, down 1536→576, and a router's and a forecaster's 576→72 and 576→100;
- ONNX Runtime fp32: one MLP unit's three MatMuls (576→1536 twice, 1536→576), a chain
  of --chain units in one session (the call overhead spread over them).

Best of --rounds rounds, the row counts interleaved. Ratio: time for R rows / time for 1 row.

    .venv/bin/python bench/matmul_rows.py --out docs/results/matmul_rows
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irc.benchmark.results import results_path  # noqa: E402

SHAPES = {"q/o 576→576": (576, 576), "k/v 576→192": (576, 192), "gate/up 576→1536": (576, 1536),
          "down 1536→576": (1536, 576), "router 576→72": (576, 72), "forecaster 576→100": (576, 100)}


def best_us(fn, rounds: int, calls: int = 50) -> float:
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def torch_rows(rows: list[int], rounds: int) -> dict:
    torch.manual_seed(0)
    out = {}
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
        xs = {r: torch.randn(r, k, dtype=torch.bfloat16) for r in rows}
        times = dict.fromkeys(rows, float("inf"))
        with torch.inference_mode():
            for _ in range(rounds // 5):  # interleave the row counts
                for r in rows:
                    times[r] = min(times[r], best_us(lambda x=xs[r], w=w: F.linear(x, w), 5))
        out[name] = times
    return out


def ort_rows(rows: list[int], rounds: int, chain: int) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i in range(chain):
        for j, (k, n) in enumerate(((576, 1536), (576, 1536), (1536, 576))):
            inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), f"w{i}_{j}"))
        nodes += [helper.make_node("MatMul", [cur, f"w{i}_0"], [f"g{i}"]), helper.make_node("MatMul", [cur, f"w{i}_1"], [f"u{i}"]),
                  helper.make_node("Mul", [f"g{i}", f"u{i}"], [f"h{i}"]), helper.make_node("MatMul", [f"h{i}", f"w{i}_2"], [f"d{i}"]),
                  helper.make_node("Add", [cur, f"d{i}"], [f"r{i}"])]
        cur = f"r{i}"
    graph = helper.make_graph(nodes, "mlp_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 576])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["rows", 576])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {r: {"x": (rng.standard_normal((r, 576)) * 0.1).astype(np.float32)} for r in rows}
    times = dict.fromkeys(rows, float("inf"))
    for _ in range(rounds // 5):
        for r in rows:
            times[r] = min(times[r], best_us(lambda f=feeds[r]: session.run(None, f), 5, calls=10) / chain)
    return {"MLP unit (3 MatMuls)": times}, ort.__version__


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--chain", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "matmul_rows"))
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]

    results = {"torch bf16": torch_rows(rows, args.rounds)}
    results["onnxruntime fp32"], ort_version = ort_rows(rows, args.rounds, args.chain)
    command = "python bench/matmul_rows.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results_path(out, ".json").write_text(json.dumps(
        {"command": command.strip(), "rows": rows, "rounds": args.rounds, "torch": torch.__version__,
         "onnxruntime": ort_version, "threads": torch.get_num_threads(),
         "us": {b: {n: {str(r): t for r, t in v.items()} for n, v in d.items()} for b, d in results.items()}},
        indent=2) + "\n")
    lines = ["# What a unit's products cost for 1 to 8 rows", "",
             f"SmolLM2-135M's shapes; torch {torch.__version__} (bf16, `F.linear`), ONNX Runtime {ort_version} "
             f"(fp32, a chain of {args.chain} MLP units); {torch.get_num_threads()} threads; best of {args.rounds} "
             "rounds, row counts interleaved. µs per product (ONNX Runtime: per MLP unit), and against 1 row.",
             "", f"Command: `{command.strip()}`", "",
             "| backend | product | " + " | ".join(f"{r} row{'s' if r > 1 else ''}" for r in rows) + " |",
             "|---|---|" + "---:|" * len(rows)]
    for backend, d in results.items():
        for name, t in d.items():
            lines.append(f"| {backend} | {name} | "
                         + " | ".join(f"{t[r]:.1f} µs ({t[r] / t[rows[0]]:.2f}×)" for r in rows) + " |")
    results_path(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
