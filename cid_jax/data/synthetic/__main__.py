"""python -m cid_jax.data.synthetic --out=DIR --num=N: the builder's `synthetic` subcommand."""
import sys

from cid_jax.data import builder

if __name__ == "__main__":
    raise SystemExit(builder.main(["synthetic", *sys.argv[1:]]))
