"""Runs N cooperating JAX processes on this machine (CPU devices), as a pod would run N hosts.

    python launch/local_multiprocess.py --num_processes=2 --devices_per_process=4 -- \
        --config=configs/demo.py --workdir=/tmp/cid_mp

Each process gets `--coordinator_address`, `--num_processes`, `--process_id` and
`devices_per_process` simulated CPU devices. Exits with the first non-zero exit code.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str, devices: int) -> str:
    """`xla_flags` with the simulated CPU device count set to `devices` (the caller's other XLA
    flags are kept)."""
    kept = [f for f in xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def start(num_processes: int, devices_per_process: int, args: list[str],
          module: str = "cid_jax.train", env: dict | None = None, **popen) -> list[subprocess.Popen]:
    """The N processes, started (a caller that signals one host, as a preemption would, keeps them)."""
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for pid in range(num_processes):
        penv = dict(os.environ if env is None else env)
        penv["JAX_PLATFORMS"] = "cpu"
        penv["XLA_FLAGS"] = with_device_count(penv.get("XLA_FLAGS", ""), devices_per_process)
        cmd = [sys.executable, "-m", module, f"--coordinator_address={address}",
               f"--num_processes={num_processes}", f"--process_id={pid}", *args]
        procs.append(subprocess.Popen(cmd, env=penv, **popen))
    return procs


def launch(num_processes: int, devices_per_process: int, args: list[str],
           module: str = "cid_jax.train", env: dict | None = None) -> int:
    """Runs the N processes to the end: the first non-zero exit code, else 0."""
    codes = [p.wait() for p in start(num_processes, devices_per_process, args, module, env)]
    return next((c for c in codes if c), 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_processes", type=int, default=2)
    ap.add_argument("--devices_per_process", type=int, default=4)
    ap.add_argument("--module", default="cid_jax.train")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the training flags")
    a = ap.parse_args()
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    sys.exit(launch(a.num_processes, a.devices_per_process, rest, a.module))


if __name__ == "__main__":
    main()
