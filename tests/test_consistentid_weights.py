"""ConsistentID checkpoint import/export: key tables, full-size round trips, files, errors, CLIs.

The key tables in tests/data are copies of ../shared/reference/consistentid_keys_{sd15,sdxl}.txt,
derived from the reference module definitions (not from our code).
"""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from cid_jax.models.sites import flax_path_to_site_name, processor_order_key, processor_sites, site_name_to_flax_path
from cid_jax.weights import consistentid as W
from cid_jax.weights.state_dict import WeightsError

DATA = pathlib.Path(__file__).parent / "data"
REPO = pathlib.Path(__file__).resolve().parents[1]


def parse_table(path):
    """(top-level keys, [(index, name, hidden)], {group: [(key, shape)]}) from a key table file."""
    import re

    top, sites, groups = None, [], {}
    for line in path.read_text().splitlines():
        m = re.match(r"#\s+(\d+) (\S+)\.processor \((\d+)\)", line)
        if m:
            sites.append((int(m[1]), m[2], int(m[3])))
        elif line.startswith("# top-level"):
            top = re.findall(r"'(\w+)'", line)
        elif line and not line.startswith("#"):
            group, key, shape = line.split("\t")
            groups.setdefault(group, []).append((key, tuple(json.loads(shape))))
    return top, sites, groups


TABLES = {"sd15": parse_table(DATA / "consistentid_keys_sd15.txt"),
          "sdxl": parse_table(DATA / "consistentid_keys_sdxl.txt")}


def random_params(layout, seed=0):
    """Full-size params from eval_shape shapes + numpy random; leaf values depend on (seed, path)."""
    abstract = W.abstract_params(layout)
    out = {}
    for g, tree in abstract.items():
        flat = traverse_util.flatten_dict(tree)
        out[g] = traverse_util.unflatten_dict({p: leaf_value(seed, g, p, s.shape) for p, s in flat.items()})
    return out


def leaf_value(seed, group, path, shape):
    """Random sign and 23-bit mantissa, exponent fixed (values in +-[0.5, 1), never NaN/inf):
    every element differs bit-wise from its neighbours, and random bytes are fast to make."""
    import zlib

    rng = np.random.default_rng([seed, zlib.crc32("/".join((group,) + path).encode())])
    bits = np.frombuffer(rng.bytes(4 * int(np.prod(shape))), np.uint32)
    return ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000)).view(np.float32).reshape(shape)


def key_shapes(groups):
    return {g: [(k, tuple(v.shape)) for k, v in sd.items()] for g, sd in groups.items()}


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_layout_and_reference_keys_equal_the_tables(base):
    layout = W.LAYOUTS[base]
    top, sites, groups = TABLES[base]
    assert list(layout.groups) == top
    assert [(s.index, s.name, s.hidden_size) for s in layout.sites] == sites
    assert all(s.is_cross == s.name.endswith("attn2") == (s.index % 2 == 1) for s in layout.sites)
    assert W.reference_keys(layout) == groups  # same keys, shapes and order


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_processor_sites_follow_diffusers_attn_processors(which):
    """Our site order and widths against diffusers' own `attn_processors` on tiny configs."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("torch")
    cfg = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
               cross_attention_dim=16, attention_head_dim=2,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if which == "sdxl":
        cfg.update(block_out_channels=(32, 32, 64), transformer_layers_per_block=(1, 2, 3),
                   attention_head_dim=(2, 2, 4), layers_per_block=2,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    unet = diffusers.UNet2DConditionModel(**cfg)
    names = [n[: -len(".processor")] for n in unet.attn_processors]
    sites = processor_sites(cfg)
    assert [s.name for s in sites] == names
    for s in sites:
        attn = unet.get_submodule(s.name)
        assert attn.to_q.in_features == s.hidden_size
        assert attn.to_k.in_features == (16 if s.is_cross else s.hidden_size)
    assert sorted(names, key=processor_order_key) == names


def test_flax_paths_and_names():
    name = "mid_block.attentions.0.transformer_blocks.9.attn2"
    path = site_name_to_flax_path(name)
    assert path == ("mid_block", "attentions_0", "transformer_blocks_9", "attn2")
    assert flax_path_to_site_name(path) == name
    assert W.perceiver_key(("perceiver_resampler", "layers_3", "ff", "fc2", "kernel")) == \
        "perceiver_resampler.layers.3.1.3.weight"
    assert W.perceiver_key(("proj_0", "bias")) == "proj.0.bias"
    assert W.perceiver_key(("fuse_module", "mlp1", "layernorm", "scale")) == "fuse_module.mlp1.layernorm.weight"


@pytest.fixture(scope="module")
def sd15_params():
    return random_params(W.SD15)


def assert_trees_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert set(fa) == set(fb)
    for p in fa:
        x, y = np.asarray(fa[p]), np.asarray(fb[p])
        assert x.dtype == y.dtype and np.array_equal(x, y), "/".join(p)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_sd15_full_size_file_round_trip_is_bit_exact(sd15_params, tmp_path, suffix):
    torch = pytest.importorskip("torch") if suffix == ".bin" else None
    path = tmp_path / f"ConsistentID{suffix}"
    meta = W.make_metadata(W.SD15, base_model="runwayml/stable-diffusion-v1-5", pairing="by_name",
                           step=1234, dtype="fp32")
    written = W.save_checkpoint(sd15_params, W.SD15, path, metadata=meta)
    W.verify_written(path, written, W.SD15)
    groups = W.read_groups(path)
    got, want = key_shapes(groups), TABLES["sd15"][2]
    if suffix == ".safetensors":  # safetensors stores keys sorted; the pickle keeps the reference order
        # The flat file uses the reference's flat-file prefixes (its convert script / SDXL pipeline).
        assert sorted(groups) == ["FacialEncoder", "adapter_modules", "image_proj_model"]
        want = dict(want, image_proj_model=want.pop("image_proj"))
        got, want = ({g: sorted(v) for g, v in t.items()} for t in (got, want))
    assert got == want
    if torch is not None:  # the reference layout: a nested dict of three OrderedDicts, nothing else
        top = torch.load(path, map_location="cpu", weights_only=True)
        assert list(top) == ["FacialEncoder", "image_proj", "adapter_modules"]
        assert all(v.dtype == torch.float32 for sd in top.values() for v in sd.values())
        assert W.sidecar_path(path).exists()
    assert W.read_metadata(path)["pairing"] == "by_name" and W.read_metadata(path)["step"] == "1234"
    assert W.detect_layout(groups) == W.SD15
    assert_trees_equal(W.import_reference(groups, W.SD15), sd15_params)


def test_another_base_models_file_is_named_as_such(sd15_params):
    """An SDXL file given to an SD1.5 model (and the reverse) says which families, not N shape mismatches."""
    groups = W.export_reference(sd15_params, W.SD15)
    with pytest.raises(W.WeightsError, match=r"this is an SD1\.5 checkpoint \(32 attention processors\); "
                                             r"the model is an SDXL one \(140\)"):
        W.import_reference(groups, W.SDXL)
    small = dict(groups, adapter_modules={k: v for k, v in groups["adapter_modules"].items()
                                          if int(k.split(".")[0]) < 14})
    with pytest.raises(W.WeightsError, match="smaller preset"):
        W.detect_layout(small)


def test_fp16_export_and_no_partial_files(sd15_params, tmp_path):
    path = tmp_path / "half.safetensors"
    written = W.save_checkpoint(sd15_params, W.SD15, path, dtype="fp16")
    assert all(v.dtype == np.float16 for sd in written.values() for v in sd.values())
    W.verify_written(path, written, W.SD15)
    back, _ = W.load_checkpoint(path)
    leaf = back["adapter_modules"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"]["processor"][
        "to_k_ip"]["kernel"]
    want = sd15_params["adapter_modules"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"][
        "processor"]["to_k_ip"]["kernel"]
    np.testing.assert_array_equal(leaf, want.astype(np.float16).astype(np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["half.safetensors"]  # no temp files left
    with pytest.raises(ValueError, match="bf16"):
        W.export_reference(sd15_params, W.SD15, dtype="bf16")


@pytest.mark.slow
def test_sdxl_full_size_round_trip_is_bit_exact():
    """868M params: export -> import in memory, the originals regenerated leaf by leaf to save memory."""
    params = random_params(W.SDXL, seed=7)
    groups = W.export_reference(params, W.SDXL)
    del params
    assert key_shapes(groups) == TABLES["sdxl"][2]
    back = W.import_reference(groups, W.SDXL)
    del groups
    for g, tree in back.items():
        for p, v in traverse_util.flatten_dict(tree).items():
            assert v.dtype == np.float32 and np.array_equal(v, leaf_value(7, g, p, v.shape)), "/".join(p)


def test_ip_adapter_faceid_plus_imports_as_init(sd15_params, tmp_path):
    torch = pytest.importorskip("torch")
    groups = W.export_reference(sd15_params, W.SD15)
    path = tmp_path / "ip-adapter-faceid-plusv2_sd15.bin"
    torch.save({"image_proj": {k: torch.from_numpy(v) for k, v in groups["image_proj"].items()},
                "ip_adapter": {k: torch.from_numpy(v) for k, v in groups["adapter_modules"].items()}}, path)
    with pytest.raises(WeightsError, match="FacialEncoder"):
        W.load_checkpoint(path)  # a ConsistentID checkpoint needs all three groups
    back, layout = W.load_checkpoint(path, required=("image_proj", "adapter_modules"))
    assert layout == W.SD15 and back["facial_encoder"] is None
    assert_trees_equal(back["image_proj"], sd15_params["image_proj"])
    assert_trees_equal(back["adapter_modules"], sd15_params["adapter_modules"])


def test_import_errors_name_keys_and_shapes(sd15_params):
    groups = {g: dict(sd) for g, sd in W.export_reference(sd15_params, W.SD15).items()}
    ad = groups["adapter_modules"]
    del ad["31.to_v_ip.weight"]
    ad["32.to_q_lora.down.weight"] = np.zeros((128, 1280), np.float32)
    ad["1.to_k_ip.weight"] = np.zeros((320, 1024), np.float32)
    with pytest.raises(WeightsError) as e:
        W.import_reference(groups, W.SD15)
    msg = str(e.value)
    assert "31.to_v_ip.weight" in msg and "32.to_q_lora.down.weight" in msg
    assert "1.to_k_ip.weight" in msg and "(320, 1024)" in msg and "(768, 320)" in msg
    with pytest.raises(WeightsError, match="unexpected top-level"):
        W.import_reference({**groups, "unet_extra": {}}, W.SD15)


def test_export_errors_name_paths(sd15_params):
    bad = dict(sd15_params)
    adapters = traverse_util.flatten_dict(sd15_params["adapter_modules"])
    path = ("up_blocks_2", "attentions_1", "transformer_blocks_0", "attn2", "processor", "to_v_ip", "kernel")
    adapters.pop(path)
    bad["adapter_modules"] = traverse_util.unflatten_dict(adapters)
    with pytest.raises(WeightsError, match=r"21\.to_v_ip\.weight"):
        W.export_reference(bad, W.SD15)
    with pytest.raises(WeightsError, match="missing"):
        W.export_reference({**sd15_params, "facial_encoder": None}, W.SD15)
    partial = W.export_reference({**sd15_params, "facial_encoder": None}, W.SD15, partial=True)
    assert list(partial) == ["image_proj", "adapter_modules"]


def test_params_files_and_sources(sd15_params, tmp_path):
    W.save_params_msgpack(sd15_params, tmp_path / "run" / "params.msgpack", {"pairing": "reference"})
    params, meta, layout = W.load_params(tmp_path / "run")
    assert layout == W.SD15 and meta == {"pairing": "reference"}
    assert_trees_equal(params, sd15_params)
    orbax = tmp_path / "orbax_run"
    (orbax / "1000").mkdir(parents=True)
    # The weights layer reads files; a folder without one params file is refused with what it
    # expected (training run directories are read by cid_jax.run: tests/test_train.py).
    with pytest.raises(WeightsError, match="expected one params file"):
        W.load_params(orbax)


def run_cli(script, *args):
    return subprocess.run([sys.executable, str(REPO / "convert" / script), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_cli_help():
    for script in ("to_pytorch.py", "from_pytorch.py"):
        r = run_cli(script, "--help")
        assert r.returncode == 0 and "--checkpoint" in r.stdout and "--out" in r.stdout


def test_cli_round_trip(sd15_params, tmp_path, capsys):
    """from_pytorch (reference .bin -> msgpack) then to_pytorch (msgpack -> .bin), self-checks on."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "convert"))
    try:
        import from_pytorch
        import to_pytorch
    finally:
        sys.path.pop(0)
    src = tmp_path / "ConsistentID-v1.safetensors"
    W.save_checkpoint(sd15_params, W.SD15, src)
    assert from_pytorch.main([f"--checkpoint={src}", f"--out={tmp_path / 'init.msgpack'}"]) == 0
    out = tmp_path / "export.bin"
    assert to_pytorch.main([f"--checkpoint={tmp_path / 'init.msgpack'}", f"--out={out}", "--step=7"]) == 0
    assert "self-check passed" in capsys.readouterr().out
    meta = W.read_metadata(out)
    assert meta["pairing"] == "reference" and meta["step"] == "7" and meta["layout"] == "sd15"
    a, b = W.read_groups(src), W.read_groups(out)
    a["image_proj"] = a.pop("image_proj_model")  # the flat file's name for the same group
    assert sorted(a) == sorted(b) and all(np.array_equal(a[g][k], b[g][k]) for g in a for k in a[g])
    # Readable failure: a missing file, and a params file with a wrong shape.
    assert to_pytorch.main([f"--checkpoint={tmp_path / 'nope.msgpack'}", f"--out={out}"]) == 3  # missing
    ip = traverse_util.flatten_dict(sd15_params["image_proj"])  # one small group is enough here
    ip[("perceiver_resampler", "norm_out", "scale")] = np.ones(2048, np.float32)
    W.save_params_msgpack({"image_proj": traverse_util.unflatten_dict(ip)}, tmp_path / "bad.msgpack",
                          {"pairing": "reference"})
    assert to_pytorch.main([f"--checkpoint={tmp_path / 'bad.msgpack'}", f"--out={tmp_path / 'x.bin'}",
                            "--layout=sd15", "--allow-partial"]) == 2
    err = capsys.readouterr().err
    assert "perceiver_resampler/norm_out/scale" in err and "(2048,)" in err and "(768,)" in err
    assert not (tmp_path / "x.bin").exists()
    # An integer tensor where a float weight belongs is refused, naming the key (never cast).
    from cid_jax.weights.state_dict import read_state_dict, write_safetensors_atomic

    flat = read_state_dict(src)
    key = "adapter_modules.0.to_q_lora.down.weight"
    flat[key] = flat[key].astype(np.int64)
    write_safetensors_atomic(flat, tmp_path / "int.safetensors")
    assert from_pytorch.main([f"--checkpoint={tmp_path / 'int.safetensors'}", f"--out={tmp_path / 'i.msgpack'}"]) == 2
    err = capsys.readouterr().err
    assert "0.to_q_lora.down.weight" in err and "int64" in err and "Traceback" not in err
    assert not (tmp_path / "i.msgpack").exists()


def test_tiny_facial_encoder_layout_round_trip():
    """Tiny demo/test models shrink the FacialEncoder's Perceiver; the key table follows the layout."""
    import dataclasses

    layout = dataclasses.replace(W.SD15, fe_dim=64, fe_depth=2, fe_heads=4)
    keys = dict(W.reference_keys(layout)["FacialEncoder"])
    assert keys["visual_projection.layers.1.0.to_kv.weight"] == (128, 64)
    assert "visual_projection.layers.2.0.to_q.weight" not in keys
    params = {"facial_encoder": random_params_group(layout, "facial_encoder")}
    groups = W.export_reference(params, layout, partial=True)
    assert [(k, v.shape) for k, v in groups["FacialEncoder"].items()] == list(keys.items())
    back = W.import_reference(groups, layout, required=("facial_encoder",))
    assert_trees_equal(back["facial_encoder"], params["facial_encoder"])


def random_params_group(layout, group, seed=3):
    flat = traverse_util.flatten_dict(W.abstract_params(layout, [group])[group])
    return traverse_util.unflatten_dict({p: leaf_value(seed, group, p, s.shape) for p, s in flat.items()})
