#!/usr/bin/env python
"""Import a PyTorch ConsistentID (or IP-Adapter FaceID-Plus) checkpoint into cid_jax params.

    python convert/from_pytorch.py --checkpoint=ConsistentID-v1.bin --out=init.msgpack
    python convert/from_pytorch.py --checkpoint=ip-adapter-faceid-plusv2_sd15.bin --out=init.msgpack

Reads the reference nested `.bin` (torch.load with weights_only=True: no code in the file runs) or
a flat `.safetensors` with `FacialEncoder.` / `image_proj_model.` (or `image_proj.`) /
`adapter_modules.` prefixes; `unet.*` keys of a training state are skipped. An IP-Adapter
FaceID-Plus/PlusV2 SD1.5 file (`image_proj` + `ip_adapter`) gives image_proj and adapters only
(FaceID-PlusV2's shortcut is a run-time flag, not a weight). Every group is loaded strictly:
missing and unexpected keys are named, and a shape mismatch names the key and both shapes.

Writes our params as a flax msgpack {facial_encoder, image_proj, adapter_modules, __metadata__};
the adapters are `<attention path>/processor/...` subtrees ready to merge into the UNet's params.
The written file is read back and compared bit for bit.
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
    p = cli.ArgumentParser(prog="convert/from_pytorch.py", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="reference .bin or prefixed .safetensors")
    p.add_argument("--out", required=True, help="output params file (.msgpack)")
    p.add_argument("--layout", choices=("sd15", "sdxl"), default=None,
                   help="base model family (default: detected from the weights)")
    p.add_argument("--pairing", choices=("reference", "by_name"), default=None,
                   help="pairing mode to record (default: the file's metadata, else 'reference', "
                        "which the released ConsistentID weights were trained with)")
    return p.parse_args(argv)


@cli.entry_point("from_pytorch")
def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    from cid_jax.weights import consistentid as W

    params, metadata, layout = W.import_to_params_file(args.checkpoint, args.out, layout=args.layout,
                                                       pairing=args.pairing)
    counts = {g: sum(int(np.size(x)) for x in jax.tree.leaves(params[g])) for g in W.OUR_GROUPS
              if params[g] is not None}
    kind = ", IP-Adapter FaceID-Plus init" if metadata["source_kind"] != "consistentid" else ""
    print(f"wrote {args.out} ({layout.base}{kind}): "
          + ", ".join(f"{g} {n:,} params" for g, n in counts.items()) + "; self-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
