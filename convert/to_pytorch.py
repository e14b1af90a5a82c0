#!/usr/bin/env python
"""Export cid_jax ConsistentID weights to the reference PyTorch layout, for CUDA inference.

    python convert/to_pytorch.py --checkpoint=RUN_DIR --out=ConsistentID-v1.bin
    python convert/to_pytorch.py --checkpoint=params.msgpack --out=model.safetensors --dtype=fp16

--out=*.bin writes the reference nested pickle {FacialEncoder, image_proj, adapter_modules}
(SDXL: image_proj_model), the only format the reference SD1.5 pipeline loads; metadata goes to
<out>.json beside it. --out=*.safetensors writes the flat file with the reference's prefixes
(FacialEncoder., image_proj_model., adapter_modules.; no torch needed; the reference SDXL pipeline
and its convert script read it), metadata in its header. Keys and shapes equal the reference tables
exactly; processor indices follow diffusers' `unet.attn_processors` order.

--checkpoint takes a training run directory (its newest readable checkpoint, or --step), our params
file (`*.msgpack` from from_pytorch.py), a reference `*.bin`/`*.safetensors`, or a directory
holding one such file. The file is written atomically, read back and compared tensor by tensor
(bit-exact) and key by key; one that fails is removed.
"""
from __future__ import annotations

import pathlib
import sys

try:
    import cid_jax  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cid_jax import cli  # noqa: E402


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="convert/to_pytorch.py", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory, our params file, or a reference checkpoint")
    p.add_argument("--out", required=True, help="output file: .bin (reference pickle) or .safetensors")
    p.add_argument("--layout", choices=("sd15", "sdxl"), default=None,
                   help="base model family (default: detected from the weights)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="tensor dtype written")
    p.add_argument("--pairing", choices=("reference", "by_name"), default=None,
                   help="part-image/word pairing the weights were trained with "
                        "(default: from the checkpoint's metadata; required when it has none)")
    p.add_argument("--step", type=int, default=None,
                   help="run directory: the checkpoint step to export (default: the newest readable); "
                        "weights file: the training step to record in the metadata")
    p.add_argument("--base_model", default=None, help="base model recorded in the metadata")
    p.add_argument("--allow_partial", action="store_true",
                   help="export even when a group is missing (e.g. no FacialEncoder); "
                        "the reference loaders need all three groups")
    return p.parse_args(argv)


@cli.entry_point("to_pytorch")
def main(argv=None) -> int:
    args = parse_args(argv)
    from cid_jax import export

    groups, metadata, layout = export.to_pytorch(
        args.checkpoint, args.out, layout=args.layout, dtype=args.dtype, pairing=args.pairing, step=args.step,
        base_model=args.base_model, allow_partial=args.allow_partial)
    print(f"wrote {args.out} ({layout.base}, {args.dtype}): {export.summary(groups)}; self-check passed")
    print("metadata: " + ", ".join(f"{k}={v}" for k, v in metadata.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
