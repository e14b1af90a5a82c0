"""Defaults shared by every training config (configs/*.py override what differs)."""
import pathlib

import ml_collections

from cid_jax.models.sites import SD15_CAPTURE_GROUPS


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0                                   # one seed: model init, data order, noise, drops

    c.model = ml_collections.ConfigDict()
    c.model.variant = "sd15"                     # "sd15" or "sdxl"
    c.model.base = ""                            # local diffusers SD folder (unet/ vae/ text_encoder/ ...)
    c.model.image_encoder = ""                   # local laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder
    c.model.preset = ""                          # random weights of a cid_jax.models.presets architecture
                                                 # (tiny-sd15, ...) when model.base is empty
    c.model.dtype = "bfloat16"                   # compute dtype; trainable params and optimizer state stay fp32
    c.model.frozen_dtype = ""                    # frozen base weights' storage dtype; "" = the compute dtype
    c.model.remat = "none"                       # backward-pass recompute: "none" (False), "attention" (the
                                                 # transformer blocks), "full" (True: every block, CLIP too)
    c.model.attention = "auto"                   # attention kernel: auto | fused | chunked | cudnn
    c.model.lora_rank = 128                      # LoRA rank on q/k/v/out of every attention
    c.model.num_id_tokens = 4                    # ID tokens from ProjPlus appended to the 77 text tokens
    c.model.ip_scale = 1.0                       # weight of the decoupled ID attention branch
    c.model.projplus_shortcut = False            # FaceID-PlusV2 shortcut (SD1.5 off, SDXL on)
    c.model.facial_loss_mode = "cross"           # "cross" (paper), "self" (reference code), "none"
    c.model.capture_groups = SD15_CAPTURE_GROUPS  # UNet block groups whose attention feeds the loss
    c.model.facial_encoder = ml_collections.ConfigDict()  # overrides of the Perceiver width/depth
    c.model.init_from = ""                       # optional ConsistentID / IP-Adapter FaceID-Plus checkpoint

    c.noise = ml_collections.ConfigDict()
    c.noise.num_train_timesteps = 1000           # DDPM steps
    c.noise.beta_start = 0.00085                 # SD1.5 scaled-linear betas
    c.noise.beta_end = 0.012
    c.noise.beta_schedule = "scaled_linear"
    c.noise.prediction_type = "epsilon"          # "epsilon" (SD1.5/SDXL) or "v_prediction"

    c.data = ml_collections.ConfigDict()
    c.data.path = ""                             # FGID records written by the tfds builder
    c.data.synthetic = 0                         # >0: build this many synthetic faces if path is empty
    c.data.resolution = 512                      # training image side
    c.data.mask_resolution = 64                  # facial masks handed to the loss (<= resolution)
    c.data.pairing = "by_name"                   # part image <-> facial word: "by_name" or "reference"
    c.data.drop_prob = 0.1                       # text + CLIP image drop (classifier-free guidance)
    c.data.foreground_loss_prob = 0.5            # samples whose noise loss is masked to the foreground
    c.data.max_text_length = 340                 # longer facial captions fall back to the caption only
    c.data.num_parallel_calls = -1               # tf.data AUTOTUNE
    c.data.prefetch = 2                          # batches prefetched per host

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4                            # constant, as the paper
    c.optim.warmup_steps = 0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-2
    c.optim.clip_norm = 0.0                      # 0 = no clipping (reference)
    c.optim.grad_accum = 1                       # micro-batches per update

    c.train = ml_collections.ConfigDict()
    c.train.global_batch = 16                    # over all hosts and devices
    c.train.num_steps = 500_000
    c.train.facial_loss_weight = 0.01            # lambda
    c.train.log_every = 50
    c.train.image_every = 5000                   # attention-map images in TensorBoard (0 = never)
    c.train.export_at_end = True                 # write the PyTorch checkpoint when the run ends
    c.train.export_dtype = "fp16"
    c.train.allow_config_change = False          # resume even though seed/data/optimizer fields changed

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.ocdbt = True                    # orbax's OCDBT format (few large objects: fast on GCS); False:
                                                 # one object per array (stores without conditional writes)

    c.eval = ml_collections.ConfigDict()       # identity fidelity while training (cid_jax.train_eval)
    c.eval.every_steps = 5000                    # generate + score every N steps and at the end (0 = never)
    c.eval.references = ""                       # folder of reference photos; "" = the dataset's validation
                                                 # split, else held-out synthetic faces
    c.eval.num_references = 4                    # identities taken when references is ""
    c.eval.class_word = "person"                 # the prompts' <class word> (references' class_words.json wins)
    c.eval.prompts = ("a <class word> in the snow", "a <class word> wearing a red hat")  # paper Table 2 style
    c.eval.negative_prompt = ""
    c.eval.seeds = 1                             # images per reference and prompt
    c.eval.seed = 2024                           # first noise seed
    c.eval.steps = 30                            # sampling steps
    c.eval.guidance = 5.0                        # classifier-free guidance
    c.eval.merge_step = 10                       # steps on the text-only context before the ID-augmented one
    c.eval.sampler = "euler"                     # "euler" or "ddim"
    c.eval.batch_size = 0                        # images per compiled call (0 = all at once)
    c.eval.clip_model = ""                       # transformers CLIPModel folder (CLIP-T, CLIP-I); off if empty
    c.eval.dino_model = ""                       # transformers ViTModel folder, DINO ViT-S/16 (DINO, FGIS)
    c.eval.face_models = ""                      # insightface folder, buffalo_l (FaceSim; also the refs' ID embedding)
    c.eval.parser_weights = ""                   # BiSeNet 79999_iter.pth for the references' parsing maps
    c.eval.random_metric_models = False          # tiny random metric nets (demo: machinery only, numbers meaningless)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                             # -1: all devices not used by fsdp
    c.mesh.fsdp = 1                              # parameter sharding width
    return c


# ------------------------------------------------------------------------------------- checks

_CHOICES = {
    "model.variant": ("sd15", "sdxl"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.frozen_dtype": ("", "float32", "bfloat16", "float16"),
    "model.facial_loss_mode": ("cross", "self", "none"),
    "model.attention": ("auto", "fused", "chunked", "cudnn"),
    "noise.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "noise.prediction_type": ("epsilon", "v_prediction"),
    "data.pairing": ("by_name", "reference"),
    "train.export_dtype": ("fp32", "fp16"),
    "eval.sampler": ("euler", "ddim"),
}
# field: (lowest, highest, integer); None = unbounded.
_RANGES = {
    "model.lora_rank": (1, None, True), "model.num_id_tokens": (1, None, True), "model.ip_scale": (None, None, False),
    "noise.num_train_timesteps": (1, None, True), "noise.beta_start": (0, 1, False), "noise.beta_end": (0, 1, False),
    "data.synthetic": (0, None, True), "data.resolution": (64, None, True), "data.mask_resolution": (1, None, True),
    "data.drop_prob": (0, 1, False), "data.foreground_loss_prob": (0, 1, False),
    "data.max_text_length": (1, None, True), "data.prefetch": (0, None, True),
    "optim.lr": (0, None, False), "optim.warmup_steps": (0, None, True), "optim.b1": (0, 1, False),
    "optim.b2": (0, 1, False), "optim.eps": (0, None, False), "optim.weight_decay": (0, None, False),
    "optim.clip_norm": (0, None, False), "optim.grad_accum": (1, None, True),
    "train.global_batch": (1, None, True), "train.num_steps": (1, None, True),
    "train.facial_loss_weight": (0, None, False), "train.log_every": (1, None, True),
    "train.image_every": (0, None, True), "checkpoint.every_steps": (1, None, True), "checkpoint.keep": (1, None, True),
    "mesh.fsdp": (1, None, True),
    "eval.every_steps": (0, None, True), "eval.num_references": (1, None, True), "eval.seeds": (1, None, True),
    "eval.steps": (1, None, True), "eval.guidance": (0, None, False), "eval.merge_step": (0, None, True),
    "eval.batch_size": (0, None, True),
}


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def config_problems(config) -> list[str]:
    """Every field of a training config whose value cannot work, as '--config.x.y=v: why' lines."""
    import math

    problems = []
    for field, allowed in _CHOICES.items():
        value = _get(config, field)
        if value not in allowed:
            problems.append(f"--config.{field}={value!r}: must be one of {', '.join(map(repr, allowed))}")
    for field, (lo, hi, integer) in _RANGES.items():
        value = _get(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            problems.append(f"--config.{field}={value!r}: must be {'an integer' if integer else 'a number'}")
        elif not math.isfinite(value):
            problems.append(f"--config.{field}={value!r}: must be finite")
        elif (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            problems.append(f"--config.{field}={value!r}: must be {bounds}")
    d = config.data
    if isinstance(d.resolution, int) and d.resolution % 8:
        problems.append(f"--config.data.resolution={d.resolution}: must be a multiple of 8 (the VAE's factor)")
    if isinstance(d.mask_resolution, int) and isinstance(d.resolution, int) and d.mask_resolution > d.resolution:
        problems.append(f"--config.data.mask_resolution={d.mask_resolution}: must be <= data.resolution "
                        f"({d.resolution})")
    if config.mesh.data != -1 and (not isinstance(config.mesh.data, int) or config.mesh.data < 1):
        problems.append(f"--config.mesh.data={config.mesh.data!r}: must be -1 (every device left) or >= 1")
    e = config.eval
    for field in ("references", "clip_model", "dino_model", "face_models", "parser_weights"):
        if e[field] and not pathlib.Path(e[field]).expanduser().exists():
            problems.append(f"--config.eval.{field}={e[field]!r}: no such file or folder")
    if not e.prompts or isinstance(e.prompts, str):
        problems.append(f"--config.eval.prompts={e.prompts!r}: must be a non-empty list of prompts")
    from cid_jax.models import presets, sites
    from cid_jax.models.unet import remat_mode

    try:
        remat_mode(config.model.remat)
    except ValueError:
        problems.append(f"--config.model.remat={config.model.remat!r}: must be none, attention or full "
                        "(or True/False)")

    m = config.model
    if not m.base and m.get("preset") and m.preset not in presets.NAMES:
        problems.append(f"--config.model.preset={m.preset!r}: must be one of {', '.join(presets.NAMES)} "
                        "(or set --config.model.base)")
    unknown = sorted(set(m.capture_groups) - set(sites.UNET_LAYER_NAMES))
    if unknown:
        problems.append(f"--config.model.capture_groups: unknown groups {unknown}; known: {sites.UNET_LAYER_NAMES}")
    return problems
