#!/usr/bin/env python
"""Export cid_jax ConsistentID weights to the reference PyTorch layout, for CUDA inference.

    python convert/to_pytorch.py --checkpoint=RUN_DIR --out=ConsistentID-v1.bin
    python convert/to_pytorch.py --checkpoint=params.msgpack --out=model.safetensors --dtype=fp16

--out=*.bin writes the reference nested pickle {FacialEncoder, image_proj, adapter_modules}
(SDXL: image_proj_model), the only format the reference SD1.5 pipeline loads; metadata goes to
<out>.json beside it. --out=*.safetensors writes the flat `<group>.<key>` file (no torch needed;
the reference SDXL pipeline loads it), metadata in its header. Keys and shapes equal the reference
tables exactly; processor indices follow diffusers' `unet.attn_processors` order.

--checkpoint takes our params file (`*.msgpack` from training or from_pytorch.py, or a reference
`*.bin`/`*.safetensors`), or a directory holding one such file. Orbax training-state directories
are recognised but not read yet (they come with the training code; see
cid_jax.weights.consistentid.load_params).

After writing, the file is read back and compared tensor by tensor (bit-exact) and key by key.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

try:
    import cid_jax  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

DEFAULT_BASE_MODEL = {"sd15": "runwayml/stable-diffusion-v1-5",
                      "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="our params file / directory, or a reference checkpoint")
    p.add_argument("--out", required=True, help="output file: .bin (reference pickle) or .safetensors")
    p.add_argument("--layout", choices=("sd15", "sdxl"), default=None,
                   help="base model family (default: detected from the weights)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="tensor dtype written")
    p.add_argument("--pairing", choices=("reference", "by_name"), default=None,
                   help="part-image/word pairing the weights were trained with "
                        "(default: from the checkpoint's metadata; required when it has none)")
    p.add_argument("--step", default=None, help="training step recorded in the metadata")
    p.add_argument("--base-model", default=None, help="base model recorded in the metadata")
    p.add_argument("--allow-partial", action="store_true",
                   help="export even when a group is missing (e.g. no FacialEncoder); "
                        "the reference loaders need all three groups")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cid_jax.weights import consistentid as W
    from cid_jax.weights.state_dict import WeightsError

    try:
        layout = W.LAYOUTS[args.layout] if args.layout else None
        params, meta, layout = W.load_params(args.checkpoint, layout)
        pairing = args.pairing or meta.get("pairing")
        if pairing is None:
            raise WeightsError(f"{args.checkpoint} records no pairing mode: pass --pairing=reference|by_name")
        metadata = W.make_metadata(
            layout, base_model=args.base_model or meta.get("base_model") or DEFAULT_BASE_MODEL[layout.base],
            pairing=pairing, step=args.step or meta.get("step", "unknown"), dtype=args.dtype,
            extra={"source": str(args.checkpoint)})
        groups = W.save_checkpoint(params, layout, args.out, dtype=args.dtype, metadata=metadata,
                                   partial=args.allow_partial)
        try:
            W.verify_written(args.out, groups, layout)
        except Exception:  # never leave a file behind that failed its self-check
            for p in (pathlib.Path(args.out), W.sidecar_path(args.out)):
                p.unlink(missing_ok=True)
            raise
    except (WeightsError, FileNotFoundError, NotImplementedError, ValueError) as e:
        print(f"to_pytorch: error: {e}", file=sys.stderr)
        return 2
    n_tensors = sum(len(g) for g in groups.values())
    n_params = sum(int(v.size) for g in groups.values() for v in g.values())
    print(f"wrote {args.out} ({layout.base}, {args.dtype}): "
          + ", ".join(f"{g} {len(sd)} tensors" for g, sd in groups.items())
          + f"; {n_tensors} tensors, {n_params:,} params; self-check passed")
    print("metadata: " + ", ".join(f"{k}={v}" for k, v in metadata.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
