"""What a GPU machine without TensorRT can show about the TensorRT path (``bench/gpu_check.sh``).

1. kernels    the ``irc::token_*`` Triton kernels (as the ops launch them, and as TensorRT's
              AOT launch does) against the pure-torch references: random inputs, several
              shapes and dtypes, outputs poisoned with NaN first, empty selections;
2. bandwidth  gather/scatter GB/s against a device-to-device copy of the same bytes;
3. prefill    routed vs dense prefill time with torch at Llama-3.1-8B layer shapes (random
              weights, random routing at execute fractions 1.0 / 0.75 / 0.5), B ∈ {1, 8},
              T ∈ {1024, 4096};
4. tensorrt   where ``tensorrt`` imports: an engine for a tiny routed model, against ONNX Runtime.

Prints a short table last; writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out-dir``.
``--dry-run``: small shapes on the CPU under ``TRITON_INTERPRET=1`` (set by the .sh), to
check the script itself; its numbers mean nothing and its files say so.
"""

# ruff: noqa: B023  (every timed lambda is called within its own loop iteration)
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import irc.ops  # noqa: F401  (registers irc::token_gather / irc::token_scatter)
from irc.exporters.tensorrt.kernels import launch_gather_aot, launch_scatter_aot
from irc.ops.token_gather import token_gather_reference, token_gather_triton
from irc.ops.token_scatter import token_scatter, token_scatter_reference, token_scatter_triton

FULL = {"kernel_shapes": [(4096, 4096, 3072), (32768, 4096, 16384), (8192, 576, 8192), (1000, 1500, 1),
                          (2048, 4096, 0)],
        "bandwidth": [(32768, 4096, 16384), (32768, 4096, 24576)],
        "layer": {"hidden": 4096, "heads": 32, "kv_heads": 8, "intermediate": 14336, "layers": 4},
        "batches": (1, 8), "seqs": (1024, 4096), "warmup": 2, "iters": 5}
DRY = {"kernel_shapes": [(64, 65, 20), (32, 1500, 3), (16, 64, 0)],
       "bandwidth": [(256, 64, 128)],
       "layer": {"hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "layers": 2},
       "batches": (1, 2), "seqs": (16, 32), "warmup": 1, "iters": 2}
FRACTIONS = (1.0, 0.75, 0.5)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BUDGET_S = 7 * 60  # stop starting new prefill cases past this: the whole run stays under 8 minutes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device, warmup, iters) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def check_kernels(shapes, device) -> list[dict]:
    rows = []
    for n, d, k in shapes:
        for dtype in DTYPES:
            g = torch.Generator(device="cpu").manual_seed(n + d + k)
            x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)  # [N, D]
            src = torch.randn(k, d, generator=g).to(device=device, dtype=dtype)  # [K, D]
            index = torch.randperm(n, generator=g)[:k].to(device)  # [K], unique
            errors = []
            for name, launch in (("op", lambda out: token_gather_triton(x, index, out=out)),
                                 ("aot", lambda out: launch_gather_aot(x, index, out))):
                poisoned = torch.full((k, d), float("nan"), dtype=dtype, device=device)
                if not torch.equal(launch(poisoned), token_gather_reference(x, index)):
                    errors.append(f"gather-{name}")
            base = x.clone()
            base[index] = float("nan")  # rows the kernels must overwrite
            want = token_scatter_reference(base, src, index)
            if not torch.equal(token_scatter_triton(base, src, index), want):
                errors.append("scatter-op")
            if not torch.equal(launch_scatter_aot(base.clone(), src, index), want):
                errors.append("scatter-aot")
            rows.append({"N": n, "D": d, "K": k, "dtype": str(dtype).replace("torch.", ""),
                         "passed": not errors, "failed": errors})
    return rows


def bandwidth(shapes, device, warmup, iters) -> list[dict]:
    rows = []
    for n, d, k in shapes:
        x = torch.randn(n, d, device=device, dtype=torch.bfloat16)
        index = torch.randperm(n, device=device)[:k]
        src = torch.randn(k, d, device=device, dtype=torch.bfloat16)
        out = torch.empty(k, d, device=device, dtype=torch.bfloat16)
        moved = 2 * k * d * x.element_size() + k * 8  # rows read + written, and the index
        copy_src = torch.empty(moved // 2, dtype=torch.uint8, device=device)  # read + written = moved
        copy_dst = torch.empty_like(copy_src)
        base = x.clone()
        ms = {"gather": _time_ms(lambda: token_gather_triton(x, index, out=out), device, warmup, iters),
              "scatter_in_place": _time_ms(lambda: launch_scatter_aot(base, src, index), device, warmup, iters),
              "d2d_copy": _time_ms(lambda: copy_dst.copy_(copy_src), device, warmup, iters)}
        gbps = {key: moved / (v * 1e-3) / 1e9 for key, v in ms.items()}
        rows.append({"N": n, "D": d, "K": k, "dtype": "bfloat16", "bytes": moved, "ms": ms, "GB/s": gbps,
                     "gather_vs_copy": gbps["gather"] / gbps["d2d_copy"]})
    return rows


class Layer(torch.nn.Module):
    """A Llama decoder layer (pre-norm attention with GQA, SwiGLU MLP), random weights, plus a
    router (D → H → 2) and a forecaster (D → 100 → D) per unit for the routed variant."""

    def __init__(self, hidden, heads, kv_heads, intermediate):
        super().__init__()
        hd, lin = hidden // heads, torch.nn.Linear
        self.heads, self.kv_heads, self.hd = heads, kv_heads, hd
        self.q, self.k, self.v = lin(hidden, heads * hd, False), lin(hidden, kv_heads * hd, False), \
            lin(hidden, kv_heads * hd, False)
        self.o = lin(heads * hd, hidden, False)
        self.gate, self.up, self.down = lin(hidden, intermediate, False), lin(hidden, intermediate, False), \
            lin(intermediate, hidden, False)
        self.n1, self.n2 = torch.nn.RMSNorm(hidden), torch.nn.RMSNorm(hidden)
        width = max(hidden // 4 - 200, hidden // 8)
        self.routers = torch.nn.ModuleList(torch.nn.Sequential(lin(hidden, width), torch.nn.ReLU(), lin(width, 2))
                                           for _ in range(2))
        self.lffs = torch.nn.ModuleList(torch.nn.Sequential(lin(hidden, 100), torch.nn.SiLU(), lin(100, hidden))
                                        for _ in range(2))

    def _kv(self, a, B, T):  # [B, T, D] -> [B, kvH, T, hd] each
        return (t(a).view(B, T, self.kv_heads, self.hd).transpose(1, 2) for t in (self.k, self.v))

    def dense(self, x):  # [B, T, D]
        B, T, _ = x.shape
        a = self.n1(x)
        q = self.q(a).view(B, T, self.heads, self.hd).transpose(1, 2)
        k, v = self._kv(a, B, T)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(att.transpose(1, 2).reshape(B, T, -1))
        a = self.n2(x)
        return x + self.down(torch.nn.functional.silu(self.gate(a)) * self.up(a))

    def routed(self, x, pos):  # pos [B, k]: the executed positions of every row, sorted
        B, T, D = x.shape
        kq = pos.shape[1]
        flat = (pos + torch.arange(B, device=x.device)[:, None] * T).reshape(-1)  # [B*k] rows of [B*T, D]
        a = self.n1(x)
        self.routers[0](a)  # the decision itself is random here; its cost is real
        k, v = self._kv(a, B, T)  # keys and values for every token
        q = self.q(torch.ops.irc.token_gather(a.reshape(-1, D), flat)).view(B, kq, self.heads, self.hd)
        mask = torch.arange(T, device=x.device)[None, None, :] <= pos[:, :, None]  # [B, k, T] causal
        att = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None],
                                                               enable_gqa=True)
        y = (x + self.lffs[0](a)).reshape(-1, D)  # forecasts for every token, overwritten where executed
        done = x.reshape(-1, D)[flat] + self.o(att.transpose(1, 2).reshape(B * kq, -1))
        x = token_scatter(y, done, flat).view(B, T, D)
        a = self.n2(x)
        self.routers[1](a)
        rows = torch.ops.irc.token_gather(a.reshape(-1, D), flat)
        done = x.reshape(-1, D)[flat] + self.down(torch.nn.functional.silu(self.gate(rows)) * self.up(rows))
        return token_scatter((x + self.lffs[1](a)).reshape(-1, D), done, flat).view(B, T, D)


def prefill(cfg, device, dtype, deadline) -> list[dict]:
    shape = cfg["layer"]
    layers = [Layer(shape["hidden"], shape["heads"], shape["kv_heads"], shape["intermediate"]).to(device, dtype)
              for _ in range(shape["layers"])]
    rows = []
    for B in cfg["batches"]:
        for T in cfg["seqs"]:
            if time.perf_counter() > deadline:
                rows.append({"B": B, "T": T, "skipped": "time budget"})
                continue
            x = torch.randn(B, T, shape["hidden"], device=device, dtype=dtype)
            with torch.no_grad():
                dense = _time_ms(lambda: [layer.dense(x) for layer in layers], device, cfg["warmup"], cfg["iters"])
                row = {"B": B, "T": T, "dense_ms": dense, "routed_ms": {}}
                for f in FRACTIONS:
                    k = math.ceil(f * T)
                    pos = torch.rand(B, T, device=device).argsort(dim=1)[:, :k].sort(dim=1).values
                    row["routed_ms"][str(f)] = _time_ms(lambda pos=pos: [layer.routed(x, pos) for layer in layers],
                                                        device, cfg["warmup"], cfg["iters"])
            row["speedup"] = {f: dense / ms for f, ms in row["routed_ms"].items()}
            rows.append(row)
    return rows


def tensorrt_check(dry_run: bool) -> dict:
    try:
        import tensorrt
    except ImportError as e:
        return {"ran": False, "reason": f"tensorrt does not import: {e}"}
    if not torch.cuda.is_available():
        return {"ran": False, "reason": "no CUDA device"}
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from routed_helpers import tiny_routed

    from irc.exporters.onnx import OnnxExportConfig, export_onnx
    from irc.exporters.tensorrt import Engine, EngineBuildConfig, build_engine

    _, routed = tiny_routed("llama")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, engine_path = Path(tmp) / "model.onnx", Path(tmp) / "model.engine"
        export_onnx(routed, onnx_path, OnnxExportConfig(capacity=0.5, profile="trt", max_seq=256), log=print)
        build_engine(onnx_path, engine_path, EngineBuildConfig(opt_seq=64, max_seq=256, max_batch=4), log=print)
        engine = Engine(engine_path)
        from irc.exporters.onnx_runtime import OnnxModel

        ort_model = OnnxModel(onnx_path)
        worst = 0.0
        for B, T in ((1, 7), (2, 64), (4, 256)):
            ids = torch.randint(0, 300, (B, T))
            worst = max(worst, float((engine(ids) - ort_model(ids)).abs().max()))
    return {"ran": True, "tensorrt": tensorrt.__version__, "max_abs_diff_vs_ort": worst, "passed": worst < 5e-3}


def table(result) -> str:
    lines = ["| check | result |", "|---|---|"]
    k = result["kernels"]
    lines.append(f"| kernels vs reference ({len(k)} cases: shapes × fp32/fp16/bf16, poisoned) | "
                 f"{sum(r['passed'] for r in k)}/{len(k)} exact |")
    for r in result["bandwidth"]:
        lines.append(f"| gather K={r['K']} D={r['D']} bf16 | {r['GB/s']['gather']:.0f} GB/s "
                     f"({r['gather_vs_copy']:.2f}× d2d copy {r['GB/s']['d2d_copy']:.0f} GB/s) |")
    for r in result["prefill"]:
        if "skipped" in r:
            lines.append(f"| prefill B={r['B']} T={r['T']} | skipped ({r['skipped']}) |")
            continue
        sp = ", ".join(f"f={f}: {s:.2f}×" for f, s in r["speedup"].items())
        lines.append(f"| prefill B={r['B']} T={r['T']} dense {r['dense_ms']:.1f} ms | routed speedup {sp} |")
    t = result["tensorrt"]
    lines.append("| TensorRT engine vs ONNX Runtime | "
                 + (f"max abs diff {t['max_abs_diff_vs_ort']:.2e}" if t["ran"] else f"not run: {t['reason']}") + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="small shapes, CPU, TRITON_INTERPRET=1")
    parser.add_argument("--out-dir", help="where gpu_check.json/.md go (default docs/results; dry run: a temp dir)")
    args = parser.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--dry-run needs TRITON_INTERPRET=1 set before triton loads: run bench/gpu_check.sh --dry-run")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or bench/gpu_check.sh --dry-run here")
    start = time.perf_counter()
    cfg, device = (DRY, torch.device("cpu")) if args.dry_run else (FULL, torch.device("cuda"))
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    result = {"dry_run": args.dry_run, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "layer_shape": cfg["layer"], "prefill_dtype": str(dtype)}
    import triton

    result["triton"] = triton.__version__
    result["kernels"] = check_kernels(cfg["kernel_shapes"], device)
    print(f"kernels    {sum(r['passed'] for r in result['kernels'])}/{len(result['kernels'])} exact", flush=True)
    result["bandwidth"] = bandwidth(cfg["bandwidth"], device, cfg["warmup"], cfg["iters"])
    result["prefill"] = prefill(cfg, device, dtype, start + BUDGET_S)
    result["tensorrt"] = tensorrt_check(args.dry_run)
    result["seconds"] = round(time.perf_counter() - start, 1)
    out_dir = Path(args.out_dir or ("docs/results" if not args.dry_run else
                                    Path(os.environ.get("TMPDIR", "/tmp")) / "irc-gpu-check-dry-run"))
    out_dir.mkdir(parents=True, exist_ok=True)
    label = "DRY RUN (CPU, Triton interpreter, tiny shapes): numbers are meaningless\n\n" if args.dry_run else ""
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "gpu_check.md").write_text(
        f"# GPU check ({result['date']}, {result['device']})\n\n{label}Command: `bench/gpu_check.sh"
        f"{' --dry-run' if args.dry_run else ''}`; torch {result['torch']}, triton {result['triton']}; "
        f"{result['seconds']} s.\n\n{table(result)}\n")
    print(label + table(result))
    ok = all(r["passed"] for r in result["kernels"]) and result["tensorrt"].get("passed", True)
    print(f"{'PASSED' if ok else 'FAILED'} gpu_check {result['seconds']}s out={out_dir / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
