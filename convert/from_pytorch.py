#!/usr/bin/env python
"""Import a PyTorch ConsistentID (or IP-Adapter FaceID-Plus) checkpoint into cid_jax params.

    python convert/from_pytorch.py --checkpoint=ConsistentID-v1.bin --out=init.msgpack
    python convert/from_pytorch.py --checkpoint=ip-adapter-faceid-plusv2_sd15.bin --out=init.msgpack

Reads the reference nested `.bin` (torch.load with weights_only=True: no code in the file runs) or
a flat `.safetensors` with `FacialEncoder.` / `image_proj.` (or `image_proj_model.`) /
`adapter_modules.` prefixes; `unet.*` keys of a training state are skipped. An IP-Adapter
FaceID-Plus/PlusV2 SD1.5 file (`image_proj` + `ip_adapter`) gives image_proj and adapters only
(FaceID-PlusV2's shortcut is a run-time flag, not a weight). Every group is loaded strictly:
missing and unexpected keys are named, and a shape mismatch names the key and both shapes.

Writes our params as a flax msgpack {facial_encoder, image_proj, adapters, __metadata__}; the
adapters are `<attention path>/processor/...` subtrees ready to merge into the UNet's params.
The written file is read back and compared bit for bit.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

try:
    import cid_jax  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="reference .bin or prefixed .safetensors")
    p.add_argument("--out", required=True, help="output params file (.msgpack)")
    p.add_argument("--layout", choices=("sd15", "sdxl"), default=None,
                   help="base model family (default: detected from the weights)")
    p.add_argument("--pairing", choices=("reference", "by_name"), default=None,
                   help="pairing mode to record (default: the file's metadata, else 'reference', "
                        "which the released ConsistentID weights were trained with)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    from cid_jax.weights import consistentid as W
    from cid_jax.weights.state_dict import WeightsError

    try:
        out = pathlib.Path(args.out)
        if out.suffix != ".msgpack":
            raise WeightsError(f"--out must be a .msgpack file, got {out}")
        groups = W.read_groups(args.checkpoint)
        layout = W.LAYOUTS[args.layout] if args.layout else W.detect_layout(groups)
        ip_adapter = W.IP_ADAPTER in groups
        required = ("image_proj", "adapters") if ip_adapter else W.OUR_GROUPS
        params = W.import_reference(groups, layout, required=required)
        meta = W.read_metadata(args.checkpoint)
        metadata = {"layout": layout.base, "source": str(args.checkpoint),
                    "source_kind": "ip_adapter_faceid_plus" if ip_adapter else "consistentid",
                    "pairing": args.pairing or meta.get("pairing", "reference"),
                    "step": meta.get("step", "unknown"), "base_model": meta.get("base_model", "unknown")}
        W.save_params_msgpack(params, out, metadata)
        try:
            self_check(out, params, metadata, layout)
        except Exception:  # never leave a file behind that failed its self-check
            out.unlink(missing_ok=True)
            raise
    except (WeightsError, FileNotFoundError, ValueError) as e:
        print(f"from_pytorch: error: {e}", file=sys.stderr)
        return 2
    counts = {g: sum(int(np.size(x)) for x in jax.tree.leaves(params[g])) for g in W.OUR_GROUPS
              if params[g] is not None}
    print(f"wrote {out} ({layout.base}{', IP-Adapter FaceID-Plus init' if ip_adapter else ''}): "
          + ", ".join(f"{g} {n:,} params" for g, n in counts.items()) + "; self-check passed")
    return 0


def self_check(out, params, metadata, layout):
    """Reads `out` back: same groups and leaves bit for bit, shapes fit the layout, same metadata."""
    import numpy as np
    from flax import traverse_util

    from cid_jax.weights import consistentid as W
    from cid_jax.weights.state_dict import WeightsError

    back, back_meta = W.load_params_msgpack(out)
    W.check_params(back, layout)
    for g in W.OUR_GROUPS:
        if (params[g] is None) != (back[g] is None):
            raise WeightsError(f"{out}: group {g} did not survive the round trip")
        if params[g] is None:
            continue
        a, b = traverse_util.flatten_dict(params[g]), traverse_util.flatten_dict(back[g])
        if set(a) != set(b):
            raise WeightsError(f"{out}: {g} paths differ after re-reading")
        for path in a:
            if not np.array_equal(np.asarray(a[path]), np.asarray(b[path])):
                raise WeightsError(f"{out}: {g}/{'/'.join(path)} differs after re-reading")
    if back_meta != metadata:
        raise WeightsError(f"{out}: metadata differs after re-reading")


if __name__ == "__main__":
    sys.exit(main())
