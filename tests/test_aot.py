"""AOT compilation of the real training step for a TPU topology (needs the `tpu` extra: libtpu).

One compile of the demo config for a 4-chip v5e topology; everything else is shape arithmetic.
The TPU compiler is slow on a CPU host: ~1.5-2.5 min of CPU for the demo step.
"""
import importlib.util
import json
import pathlib

import pytest

from cid_jax import aot
from tests import helpers

ROOT = helpers.REPO
TOPOLOGY = "v5e:2x2"
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install 'cid_jax[tpu]')")


def demo_config(**mesh):
    config = helpers.demo_config()
    for k, v in mesh.items():
        config.mesh[k] = v
    return config


@pytest.fixture(scope="module")
def report():
    """The demo step compiled for v5e:2x2 on a data=2 x fsdp=2 mesh (the one expensive compile)."""
    return aot.compile_plan(aot.make_plan(demo_config(fsdp=2), TOPOLOGY), mfu=0.5)


@needs_libtpu
@pytest.mark.slow
def test_report_fields(report):
    r = report
    assert (r.topology, r.chip, r.n_devices, r.mesh) == (TOPOLOGY, "TPU v5e", 4, {"data": 2, "fsdp": 2})
    assert r.hbm_bytes == 16 * aot.GiB and r.peak_flops_per_chip == 197e12
    assert (r.global_batch, r.micro_batch, r.per_chip_batch) == (8, 8, 2)
    assert r.arch_source == "the tiny-sd15 preset"
    # XLA's buffer assignment agrees with the sharding plan: the compiled program's inputs hold at
    # least the (unpadded) per-chip shards we computed; TPU tiling pads small arrays, but not 2x.
    ours = r.frozen_param_bytes + r.trainable_param_bytes + r.opt_state_bytes + r.batch_bytes
    assert ours <= r.argument_bytes < 2 * ours, (ours, r.argument_bytes)
    # The train state is donated: its outputs are written in place of its inputs.
    assert r.alias_bytes >= r.trainable_param_bytes + r.opt_state_bytes
    assert r.temp_bytes > 0 and r.generated_code_bytes > 0
    assert r.total_bytes == (r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes
                             + r.generated_code_bytes)
    assert r.fits and r.total_bytes < r.hbm_bytes and r.advice == []
    # FLOPs: per chip from XLA; the step time follows from the stated MFU and the chip's peak.
    assert r.flops_per_device > 1e8
    assert r.flops_per_step == pytest.approx(4 * r.flops_per_device)
    assert r.step_time_s == pytest.approx(r.flops_per_device / (0.5 * 197e12))
    assert r.samples_per_s == pytest.approx(8 / r.step_time_s)
    # The largest arrays are listed biggest first with their shardings.
    sizes = [a.global_bytes for a in r.largest]
    assert sizes == sorted(sizes, reverse=True) and len(sizes) == 8
    assert r.largest[0].path == "frozen/text/0/text_model/embeddings/token_embedding/embedding"
    assert r.largest[0].spec == "P(None, 'fsdp')" and r.largest[0].device_bytes == 49408 * 64 * 4 // 2
    text = aot.format_report(r, "python -m cid_jax.aot --config=configs/demo.py --topology=v5e:2x2")
    for needle in ("frozen params", "optimizer state", "activations / temps", "FITS", "MFU",
                   "samples/s", "P(None, 'fsdp')"):
        assert needle in text, needle
    assert json.loads(r.to_json())["largest"][0]["spec"] == r.largest[0].spec


@needs_libtpu
@pytest.mark.slow
def test_fsdp_shards_parameters(report):
    """Per-chip parameter and optimizer bytes fall as the fsdp axis grows (1 -> 2 -> 4 chips).

    fsdp=1 and fsdp=4 are the sharding plans only (no compile): the plan is what the compiled
    program takes as its inputs, which `test_report_fields` checks against XLA at fsdp=2."""
    devices = aot.topology_devices(TOPOLOGY)
    plans = {f: aot.make_plan(demo_config(fsdp=f), TOPOLOGY, devices) for f in (1, 4)}
    for name, tree in (("frozen_param_bytes", lambda p: p.frozen),
                       ("trainable_param_bytes", lambda p: p.state.params),
                       ("opt_state_bytes", lambda p: p.state.opt_state)):
        one, four = (aot._tree_bytes(tree(plans[f])) for f in (1, 4))
        two = getattr(report, name)
        assert four < two < one, (name, one, two, four)
        assert two < 0.6 * one and four < 0.6 * two, (name, one, two, four)  # most of it is sharded


def test_preset_architectures_are_the_public_checkpoints():
    import jax

    from cid_jax import build as build_lib
    from configs import sd15, sdxl

    for variant, module in (("sd15", sd15), ("sdxl", sdxl)):
        config, source = aot.architecture_config(module.get_config())
        assert source == f"the {variant} preset (the public checkpoints' config.json)"
        model = build_lib.build_modules(config)
        assert model.is_sdxl == (variant == "sdxl") and model.unet.attention_kernel == "fused"
        assert model.unet.config.cross_attention_dim == (768 if variant == "sd15" else 2048)
    # SD1.5's UNet from the preset has the published size (859.5 M parameters), by shape only.
    config, _ = aot.architecture_config(_sd15())
    frozen = build_lib.abstract_frozen(build_lib.build_modules(config), boxed=False)
    n = sum(x.size for x in jax.tree.leaves(frozen["unet"]))
    assert abs(n - 859.52e6) < 0.01e6, n


def _sd15():
    from configs import sd15

    return sd15.get_config()


def test_batch_must_cover_the_pod():
    config = _sd15()
    with pytest.raises(aot.SetupError, match=r"global_batch=64"):
        aot.check_batch(config, 64)          # 16 samples cannot cover 64 chips
    config.optim.grad_accum = 2
    with pytest.raises(aot.SetupError, match="multiple of 32"):
        aot.check_batch(config, 16)
    config.train.global_batch = 64
    assert aot.check_batch(config, 16) == 32
    config.mesh.fsdp = 3                     # the same check training runs (trainer.step_batch)
    with pytest.raises(aot.SetupError, match="fsdp=3 does not fit the 16 devices"):
        aot.check_batch(config, 16)
    from cid_jax import trainer

    with pytest.raises(ValueError, match="fsdp"):
        trainer.validate(config)             # 8 simulated devices


def test_advice_names_the_knobs():
    common = dict(n_devices=16, hbm_bytes=16 * aot.GiB, dtype="bfloat16")
    advice = aot.advise(remat=False, temp_bytes=12 * aot.GiB, sharded_bytes=8 * aot.GiB, fsdp=1,
                        per_chip_batch=2, **common)
    assert [a.split(":")[0].split(" ")[0] for a in advice] == [
        "--config.model.remat=full", "--config.mesh.fsdp=2", "--config.optim.grad_accum=2"]
    assert "4.0 GiB at fsdp=2" in advice[1]
    # Nothing left to turn: say so rather than print nothing.
    advice = aot.advise(remat=True, temp_bytes=1, sharded_bytes=1, fsdp=16, per_chip_batch=1, **common)
    assert advice and "larger chip" in advice[0]


def test_missing_libtpu_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(aot.SetupError, match=r"pip install 'cid_jax\[tpu\]'"):
        aot.topology_devices("v5e:2x2")


def test_unknown_topology():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu not installed")
    with pytest.raises(aot.SetupError, match="generation one of"):
        aot.topology_devices("h100:8")



def test_command_line_exits_2_with_the_fix():
    """The CLI end to end, up to the first check (no compile): the paper's batch of 16 cannot cover
    64 chips; without libtpu it says how to install it instead."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "cid_jax.aot", "--config=configs/sd15.py", "--topology=v5p:4x4x4",
         "--config.mesh.fsdp=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    if importlib.util.find_spec("libtpu") is None:
        assert "pip install 'cid_jax[tpu]'" in proc.stderr
    else:
        assert "--config.train.global_batch=64" in proc.stderr, proc.stderr[-2000:]
