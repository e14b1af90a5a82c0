"""Defaults shared by every training config (configs/*.py override what differs)."""
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
    c.model.remat = False                        # rematerialise each block in the backward pass
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

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                             # -1: all devices not used by fsdp
    c.mesh.fsdp = 1                              # parameter sharding width
    return c
