"""``irc export onnx OUT -o model.onnx``: a verified ONNX file of a routed model."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a routed model (onnx) or build a TensorRT engine (trt)")
    sub = p.add_subparsers(dest="export_format", metavar="FORMAT")
    o = sub.add_parser(
        "onnx",
        help="ONNX, verified with ONNX Runtime",
        description="Export a routed model directory (or a base model, routed untrained) to ONNX with "
        "dynamic batch and sequence axes and weights as external data, then run it with ONNX Runtime on "
        "sample inputs (an odd length, a padded batch) and compare with PyTorch; a mismatch leaves no file.",
    )
    o.add_argument("model", help="routed model directory (from irc convert)")
    o.add_argument("-o", "--out", required=True, help="the .onnx file to write")
    o.add_argument("--routing", default="capacity", choices=["capacity", "threshold", "dense"],
                   help="capacity: k = ceil(c·T) tokens per row, static shapes; threshold: the calibrated "
                   "per-token decisions, data-dependent counts; dense: the base model's graph")
    o.add_argument("--capacity", type=float, help="execute fraction c (default: 1 − the trained sparsity)")
    o.add_argument("--profile", default="portable", choices=["portable", "trt"],
                   help="portable: standard ONNX ops; trt: TokenGather/TokenScatter TensorRT plugin nodes")
    o.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="precision the graph is captured and exported in (default fp32; bf16 is refused: "
                   "ONNX Runtime's CPU provider cannot run it to verify the file)")
    o.add_argument("--opset", type=int, default=18)
    o.add_argument("--max-seq", type=int, help="largest sequence length the file declares (default: the model's; "
                   "trt: at most 3840, TensorRT's TopK limit)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing file (and its .data, .json)")
    o.add_argument("--json", action="store_true", help="print the manifest as one JSON object")
    o.set_defaults(run=run_onnx)
    from irc.cli.export_trt import add_trt_parser

    add_trt_parser(sub)
    p.set_defaults(run=lambda args: p.print_help() or 2)


def run_onnx(args: argparse.Namespace) -> int:
    import sys
    import time
    from pathlib import Path

    import irc
    from irc.cache import check_output
    from irc.cli.common import emit_json, info
    from irc.errors import UserError
    from irc.exporters.onnx import OnnxExportConfig, export_onnx
    from irc.routing import is_routed_dir

    if not args.out.endswith(".onnx"):
        raise UserError(f"-o must name a .onnx file, got {args.out}")
    if Path(args.out).exists() and not args.overwrite:
        raise UserError(f"{args.out} already exists; choose another file or pass --overwrite")
    check_output(args.out)  # before minutes of lowering
    start = time.perf_counter()
    config = OnnxExportConfig(routing=args.routing, capacity=args.capacity, profile=args.profile, opset=args.opset,
                              max_seq=args.max_seq)
    routed = irc.load(args.model, dtype=args.dtype) if is_routed_dir(args.model) else \
        irc.route(irc.load_model(args.model, dtype=args.dtype))
    log = (lambda line: print(line, file=sys.stderr)) if args.json else info
    manifest = export_onnx(routed, args.out, config, log=log)
    if args.json:
        emit_json(manifest)
        return 0
    v = manifest["verification"]
    info(f"verified    ONNX Runtime {v['onnxruntime']} vs PyTorch on {len(v['cases'])} inputs: max abs diff "
         f"{v['max_abs_diff']:.2e} (tolerance {v['atol']}), argmax agreement {v['argmax_agreement']:.4f}")
    info(f"wrote       {args.out} (+ {', '.join(manifest['external_data'])})")
    if manifest.get("trt_lint"):
        info(f"trt lint    passed (TopK k ≤ 3840 for seq ≤ {manifest['trt_lint']['max_seq']})")
    capacity = f" capacity={manifest['capacity']:.2f}" if manifest["capacity"] is not None else ""
    info(f"PASSED export onnx {time.perf_counter() - start:.1f}s routing={manifest['routing']}{capacity} "
         f"profile={manifest['profile']} out={args.out}")
    return 0
