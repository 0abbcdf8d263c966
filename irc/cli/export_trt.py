"""``irc export trt model.onnx -o model.engine``: a TensorRT engine with the irc plugins."""

from __future__ import annotations

import argparse


def add_trt_parser(sub) -> None:
    t = sub.add_parser(
        "trt",
        help="TensorRT engine from a --profile trt ONNX file (needs the trt extra and an NVIDIA GPU)",
        description="Build a TensorRT engine from an ONNX file exported with --profile trt: the TokenGather / "
        "TokenScatter nodes become the irc plugins (ahead-of-time compiled Triton kernels), one optimization "
        "profile covers [batch, seq], the network is strongly typed (precision comes from the ONNX). Writes "
        "the engine and a manifest (model.engine.json).",
    )
    t.add_argument("onnx", help="the .onnx file (from irc export onnx ... --profile trt)")
    t.add_argument("-o", "--out", required=True, help="the .engine file to write")
    t.add_argument("--min-seq", type=int, default=1, help="shortest sequence (default 1)")
    t.add_argument("--opt-seq", type=int, help="sequence length to tune for (default: min(512, --max-seq))")
    t.add_argument("--max-seq", type=int,
                   help="longest sequence (default: the ONNX file's, at most 2048; TensorRT's TopK caps it at 3840)")
    t.add_argument("--max-batch", type=int, default=8, help="largest batch (default 8)")
    t.add_argument("--timing-cache", help="TensorRT timing cache file: read if present, written after the build")
    t.add_argument("--workspace", type=float, help="builder workspace limit in GB (default: TensorRT's)")
    t.add_argument("--jit", action="store_true",
                   help="use the plugins' Python implementation instead of the ahead-of-time kernels")
    t.add_argument("--json", action="store_true", help="print the manifest as one JSON object")
    t.set_defaults(run=run_trt)


def _default_max_seq(onnx_path: str) -> int:
    import json
    from pathlib import Path

    manifest = Path(onnx_path + ".json")
    declared = json.loads(manifest.read_text()).get("dynamic_axes", {}).get("seq", [1, 2048])[1] \
        if manifest.is_file() else 2048
    return min(declared, 2048)


def run_trt(args: argparse.Namespace) -> int:
    import sys
    import time

    from irc.cli.common import emit_json, info
    from irc.errors import UserError
    from irc.exporters.tensorrt import _import_tensorrt

    _import_tensorrt()  # the one-line install hint comes before any other complaint
    from irc.exporters.tensorrt.builder import EngineBuildConfig, build_engine

    if not args.out.endswith(".engine"):
        raise UserError(f"-o must name a .engine file, got {args.out}")
    from irc.cache import check_output

    check_output(args.out)
    start = time.perf_counter()
    max_seq = args.max_seq or _default_max_seq(args.onnx)
    config = EngineBuildConfig(min_seq=args.min_seq, opt_seq=args.opt_seq or min(512, max_seq), max_seq=max_seq,
                               max_batch=args.max_batch, timing_cache=args.timing_cache,
                               workspace_gb=args.workspace, prefer_aot=not args.jit)
    log = (lambda line: print(line, file=sys.stderr)) if args.json else info
    manifest = build_engine(args.onnx, args.out, config, log=log)
    if args.json:
        emit_json(manifest)
        return 0
    info(f"engine      TensorRT {manifest['tensorrt']} on {manifest['gpu']['name']}, batch "
         f"{manifest['profile']['batch']}, seq {manifest['profile']['seq']}, plugins "
         f"{manifest['plugins']['implementation']}")
    info(f"PASSED export trt {time.perf_counter() - start:.1f}s out={args.out}")
    return 0
