"""``histotransfer extract`` and ``histotransfer encoders``: thin wrappers over the features API."""

from __future__ import annotations

import argparse

from ..batch import summarize
from .encoders import PRECISIONS, encoder_info, list_encoders
from .extract import run_extraction


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract", help="extract patch features with a (truncated) encoder",
        description="Run every patch of every slide through an encoder; writes OUT/features/<encoder_id>/"
                    "<slide_id>.h5 and extract.csv. Re-running skips finished slides. Under `torchrun "
                    "--nproc-per-node G -m histotransfer extract ...` the slides are split across processes.")
    p.add_argument("--patches", required=True, help="folder of patch files (OUT/patches from `histotransfer tile`)")
    p.add_argument("--out", required=True, help="output folder (features go to OUT/features/<encoder_id>/)")
    p.add_argument("--encoder", required=True, choices=list_encoders(), metavar="NAME",
                   help="encoder name (see `histotransfer encoders`)")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (default; a histopathology encoder's published checkpoint), random, or a "
                        ".safetensors/.pth/.pt file")
    p.add_argument("--truncate", type=int, default=0, help="drop the last K stages (0-3, default 0)")
    p.add_argument("--input-size", type=int, default=None,
                   help="resize patches to S pixels (default: their tiled size)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="patch-reading processes (default: automatic; 0 reads in the main process)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="bf16/fp16 autocast on GPU")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored feature type")
    p.add_argument("--slides", default=None,
                   help="folder of slide files, for patch files whose recorded slide path is missing")
    p.set_defaults(func=_extract)

    e = subparsers.add_parser("encoders", help="list the available encoders",
                              description="List the registered encoders with their stages and feature sizes.")
    e.set_defaults(func=_encoders)


def _extract(args: argparse.Namespace) -> int:
    run = run_extraction(args.patches, args.out, args.encoder, args.weights, args.truncate, args.input_size,
                         args.batch_size, args.workers, args.device, args.precision, args.dtype, args.slides)
    prefix = f"[rank {run.rank}/{run.world}] " if run.world > 1 else ""
    print(prefix + summarize(run.results, "extract"))
    if run.rank == 0:
        print(f"features: {run.folder}")
    return 1 if any(r.status == "error" for r in run.results) else 0


def _encoders(args: argparse.Namespace) -> int:
    print(f"{'name':26} {'family':15} {'feature dim (truncate 0/1/2/3)':32} imagenet top-1")
    for name in list_encoders():
        info = encoder_info(name)
        dims = "/".join(map(str, info["feature_dims"]))
        top1 = f"{info['imagenet_top1']:.2f}" if info["imagenet_top1"] is not None else "-"
        print(f"{name:26} {info['family']:15} {dims:32} {top1}")
    return 0
