"""Diffusion noise schedules and samplers in JAX, equal to diffusers' DDPM / DDIM / Euler schedulers.

Everything on the host (beta tables, timesteps, sigmas) is computed once with numpy, following
diffusers' own precision step by step so the float32 tables agree with its PyTorch ones:
betas in float32, alphas = 1 - betas in float32, the cumulative product accumulated in float64 and
rounded to float32 (what torch.cumprod does on CPU), Euler's sigma table in float32 and its
interpolation in float64 before the final float32 cast. Everything per step is a pure function of
small pytrees, so it runs under `jit` and inside `lax.scan` with a traced step index.

Training (DDPM forward process):
    sched = NoiseSchedule.create(SchedulerConfig.from_config(cfg_dict, "DDPMScheduler"))
    x_t = add_noise(sched, x0, noise, t);  target = training_target(sched, x0, noise, t)

Sampling (DDIM or Euler; `i` is the step index 0..n-1):
    state = set_timesteps(config, n, "euler")
    x = noise * state.init_noise_sigma
    for i in range(n):
        eps = unet(state.scale_model_input(x, i), state.timesteps[i])
        x = state.step(eps, i, x).prev_sample
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# ------------------------------------------------------------------------------------- config

# diffusers' constructor defaults of the options we model, per scheduler class (0.42.1). A config
# dict is read the way `<Class>.from_config(d)` reads it: keys present win, the others take the
# *target* class's defaults (diffusers drops the source class's filled-in defaults, see
# `_use_default_values`). Note: so EulerDiscreteScheduler built from SD1.5's scheduler_config.json
# (which has no `timestep_spacing`) uses "linspace", as in diffusers.
_COMMON_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                        beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
                        steps_offset=0, rescale_betas_zero_snr=False)
DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": dict(_COMMON_DEFAULTS, clip_sample=True, clip_sample_range=1.0,
                          timestep_spacing="leading", thresholding=False),
    "DDIMScheduler": dict(_COMMON_DEFAULTS, clip_sample=True, clip_sample_range=1.0,
                          set_alpha_to_one=True, timestep_spacing="leading", thresholding=False),
    "EulerDiscreteScheduler": dict(_COMMON_DEFAULTS, timestep_spacing="linspace",
                                   interpolation_type="linear", use_karras_sigmas=False,
                                   use_exponential_sigmas=False, use_beta_sigmas=False,
                                   timestep_type="discrete", final_sigmas_type="zero"),
}

# Options we do not implement: accepted only with these values.
_UNSUPPORTED = dict(thresholding=(False,), use_karras_sigmas=(False, None),
                    use_exponential_sigmas=(False, None), use_beta_sigmas=(False, None),
                    timestep_type=("discrete",), interpolation_type=("linear",))

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler options we model. The defaults are SD1.5's config as DDIMScheduler reads it."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: Optional[tuple[float, ...]] = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    rescale_betas_zero_snr: bool = False
    # DDIM
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    # Euler
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        for name, value, allowed in (("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
                                     ("timestep_spacing", self.timestep_spacing, SPACINGS),
                                     ("prediction_type", self.prediction_type, PREDICTION_TYPES),
                                     ("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))):
            if value not in allowed:
                raise ValueError(f"scheduler {name}={value!r} is not supported (one of {allowed})")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"trained_betas has {len(self.trained_betas)} entries, "
                             f"num_train_timesteps is {self.num_train_timesteps}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], scheduler: str = "DDIMScheduler",
                    **overrides) -> "SchedulerConfig":
        """Reads a diffusers `scheduler_config.json` dict as `<scheduler>.from_config` would.

        `scheduler` is the diffusers class whose defaults fill the missing keys: "DDPMScheduler",
        "DDIMScheduler" or "EulerDiscreteScheduler". `overrides` win over both.
        """
        if scheduler not in DIFFUSERS_DEFAULTS:
            raise ValueError(f"unknown scheduler {scheduler!r}; one of {sorted(DIFFUSERS_DEFAULTS)}")
        defaults = DIFFUSERS_DEFAULTS[scheduler]
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(k for k in overrides if k not in fields and k not in _UNSUPPORTED)
        if bad:
            raise TypeError(f"unknown scheduler option(s) {bad}; known: {sorted(fields)}")
        merged = {**defaults, **{k: v for k, v in config.items() if k in defaults}, **overrides}
        for key, allowed in _UNSUPPORTED.items():
            if key in merged and merged[key] not in allowed:
                raise NotImplementedError(f"{scheduler} option {key}={merged[key]!r} is not "
                                          f"implemented (supported: {allowed})")
        kw = {k: v for k, v in merged.items() if k in fields}
        if kw.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(float(b) for b in kw["trained_betas"])
        # Options a class lacks keep their neutral value (DDPM/Euler have no set_alpha_to_one...).
        kw.setdefault("set_alpha_to_one", False)
        kw.setdefault("clip_sample", False)
        kw.setdefault("final_sigmas_type", "zero")
        return cls(**kw)


# Raw scheduler_config.json of the public checkpoints.
SD15_SCHEDULER_CONFIG: dict = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
SDXL_SCHEDULER_CONFIG: dict = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}



def standard_config(variant: str) -> dict:
    """The scheduler config the variant's base models ship (for a base folder without scheduler/)."""
    return dict(SDXL_SCHEDULER_CONFIG if variant == "sdxl" else SD15_SCHEDULER_CONFIG)


# --------------------------------------------------------------------------------- host tables


def _cumprod(alphas: np.ndarray) -> np.ndarray:
    # torch.cumprod on CPU accumulates float32 inputs in float64 and rounds each output.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's squaredcos_cap_v2 schedule (diffusers betas_for_alpha_bar, Python floats)."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts the schedule so the last step has zero SNR (Lin et al. 2023), in float32 as diffusers."""
    abar_sqrt = np.sqrt(_cumprod(np.float32(1) - betas))
    first, last = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


@functools.lru_cache(maxsize=64)
def betas_and_alphas_cumprod(config: SchedulerConfig) -> tuple[np.ndarray, np.ndarray]:
    """(betas, alphas_cumprod), float32 [T], computed as diffusers computes them (read-only)."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float32)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n).astype(np.float32)
    elif config.beta_schedule == "scaled_linear":  # linear in sqrt(beta), squared in float32
        betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n).astype(np.float32) ** 2
    else:
        betas = _cosine_betas(n)
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = _cumprod(np.float32(1) - betas)
    for a in (betas, alphas_cumprod):
        a.flags.writeable = False
    return betas, alphas_cumprod


def _spaced_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    """Inference timesteps, descending, float64 values that are whole numbers except for Euler's
    'linspace' (diffusers rounds 'linspace' only for DDIM, see `ddim_set_timesteps`)."""
    T = config.num_train_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps={n} must be in [1, num_train_timesteps={T}]")
    if config.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if config.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + config.steps_offset
    return np.round(np.arange(T, 0, -T / n)) - 1  # trailing


# ------------------------------------------------------------------------------- training


@struct.dataclass
class NoiseSchedule:
    """The forward (noising) process: a pytree of its float32 tables, config static."""
    betas: jax.Array
    alphas_cumprod: jax.Array
    config: SchedulerConfig = struct.field(pytree_node=False)

    @classmethod
    def create(cls, config: SchedulerConfig = SchedulerConfig()) -> "NoiseSchedule":
        betas, alphas_cumprod = betas_and_alphas_cumprod(config)
        return cls(betas=jnp.asarray(betas), alphas_cumprod=jnp.asarray(alphas_cumprod), config=config)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps


def _per_sample(coef: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] to broadcast against a batch of samples."""
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def _signal_noise(schedule: NoiseSchedule, t: jax.Array, like: jax.Array):
    a = schedule.alphas_cumprod[jnp.asarray(t)]
    return _per_sample(jnp.sqrt(a), like), _per_sample(jnp.sqrt(1 - a), like)


def sample_timesteps(key: jax.Array, batch: int, schedule: NoiseSchedule) -> jax.Array:
    """Uniform training timesteps in [0, T) as int32 [batch]."""
    return jax.random.randint(key, (batch,), 0, schedule.num_train_timesteps, dtype=jnp.int32)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (t: int [B] or scalar)."""
    s, n = _signal_noise(schedule, t, x0)
    return (s * x0 + n * noise).astype(x0.dtype)


def get_velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
    s, n = _signal_noise(schedule, t, x0)
    return (s * noise - n * x0).astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the model regresses for the config's prediction_type: noise, velocity or x0."""
    kind = schedule.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return get_velocity(schedule, x0, noise, t)
    return x0


# ------------------------------------------------------------------------------- sampling


@struct.dataclass
class StepOutput:
    prev_sample: jax.Array
    pred_original_sample: jax.Array


def _predict_x0_eps(kind: str, model_output, sample, alpha_t):
    """(predicted x0, predicted noise) from the model output at cumulative alpha `alpha_t`."""
    sa, sb = jnp.sqrt(alpha_t), jnp.sqrt(1 - alpha_t)
    if kind == "epsilon":
        return (sample - sb * model_output) / sa, model_output
    if kind == "sample":
        return model_output, (sample - sa * model_output) / sb
    return sa * sample - sb * model_output, sa * model_output + sb * sample  # v_prediction


@struct.dataclass
class DDIMState:
    """DDIM sampling (Song et al. 2021), diffusers' DDIMScheduler. `timesteps` int32 [n]."""
    timesteps: jax.Array
    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    init_noise_sigma: jax.Array
    config: SchedulerConfig = struct.field(pytree_node=False)
    num_inference_steps: int = struct.field(pytree_node=False, default=0)

    def scale_model_input(self, sample: jax.Array, i=None) -> jax.Array:
        return sample

    def add_noise(self, original: jax.Array, noise: jax.Array, i) -> jax.Array:
        """`original` noised to the level of timesteps[i] (diffusers' DDIMScheduler.add_noise)."""
        alpha = self.alphas_cumprod[self.timesteps[i]]
        return (jnp.sqrt(alpha) * original + jnp.sqrt(1 - alpha) * noise).astype(original.dtype)

    def step(self, model_output: jax.Array, i, sample: jax.Array, eta: float = 0.0,
             noise: Optional[jax.Array] = None) -> StepOutput:
        """One step from timesteps[i] to the previous timestep. eta > 0 needs `noise`."""
        cfg = self.config
        t = self.timesteps[i]
        # diffusers steps back by T // n whatever the spacing (so 'trailing'/'linspace' skip the
        # last timesteps' exact predecessors); we keep that for parity.
        prev_t = t - cfg.num_train_timesteps // self.num_inference_steps
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = jnp.where(prev_t >= 0, self.alphas_cumprod[jnp.maximum(prev_t, 0)],
                               self.final_alpha_cumprod)
        x0, eps = _predict_x0_eps(cfg.prediction_type, model_output, sample, alpha_t)
        if cfg.clip_sample:
            x0 = jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
        if noise is None and not (isinstance(eta, (int, float)) and eta == 0):
            raise ValueError("DDIM step with eta != 0 needs `noise` (standard normal, sample-shaped)")
        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        std = eta * jnp.sqrt(variance)
        prev = jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1 - alpha_prev - std * std) * eps
        if noise is not None:
            prev = prev + std * noise
        return StepOutput(prev_sample=prev.astype(sample.dtype), pred_original_sample=x0)


def ddim_set_timesteps(config: SchedulerConfig, num_inference_steps: int) -> DDIMState:
    """diffusers DDIMScheduler.set_timesteps: integer timesteps, descending."""
    n = num_inference_steps
    t = _spaced_timesteps(config, n)
    if config.timestep_spacing == "linspace":
        t = t.round()
    _, alphas_cumprod = betas_and_alphas_cumprod(config)
    final = np.float32(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
    return DDIMState(timesteps=jnp.asarray(t.astype(np.int64), jnp.int32),
                     alphas_cumprod=jnp.asarray(alphas_cumprod), final_alpha_cumprod=jnp.asarray(final),
                     init_noise_sigma=jnp.float32(1.0), config=config, num_inference_steps=n)


@struct.dataclass
class EulerState:
    """Euler sampling in sigma space (Karras et al. 2022), diffusers' EulerDiscreteScheduler with
    s_churn=0 (deterministic). `timesteps` float32 [n], `sigmas` float32 [n+1] (last = final sigma)."""
    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array
    config: SchedulerConfig = struct.field(pytree_node=False)

    def scale_model_input(self, sample: jax.Array, i) -> jax.Array:
        """x / sqrt(sigma_i^2 + 1): the UNet was trained on unit-variance-scaled inputs."""
        sigma = self.sigmas[i]
        return (sample / jnp.sqrt(sigma * sigma + 1)).astype(sample.dtype)

    def add_noise(self, original: jax.Array, noise: jax.Array, i) -> jax.Array:
        """`original` noised to sigmas[i] (diffusers' EulerDiscreteScheduler.add_noise: x + sigma
        noise, the variance-exploding form of the sigma space)."""
        return (original + self.sigmas[i] * noise).astype(original.dtype)

    def step(self, model_output: jax.Array, i, sample: jax.Array) -> StepOutput:
        sigma = self.sigmas[i]
        x = sample.astype(jnp.float32)
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = x - sigma * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-sigma / jnp.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1)
        else:
            x0 = model_output
        derivative = (x - x0) / sigma
        prev = x + derivative * (self.sigmas[i + 1] - sigma)
        return StepOutput(prev_sample=prev.astype(model_output.dtype), pred_original_sample=x0)


def euler_set_timesteps(config: SchedulerConfig, num_inference_steps: int) -> EulerState:
    """diffusers EulerDiscreteScheduler.set_timesteps (linear interpolation of the sigma table)."""
    n = num_inference_steps
    if config.timestep_spacing == "linspace":  # diffusers builds this one directly in float32
        t = np.linspace(0, config.num_train_timesteps - 1, n, dtype=np.float32)[::-1].copy()
    else:
        t = _spaced_timesteps(config, n).astype(np.float32)
    _, alphas_cumprod = betas_and_alphas_cumprod(config)
    if config.rescale_betas_zero_snr:  # diffusers avoids an infinite first sigma
        alphas_cumprod = alphas_cumprod.copy()
        alphas_cumprod[-1] = 2.0 ** -24
    table = np.sqrt((np.float32(1) - alphas_cumprod) / alphas_cumprod)  # float32, as torch
    sigmas = np.interp(t, np.arange(len(table)), table)  # float64
    last = table[0] if config.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    max_sigma = sigmas.max()
    if config.timestep_spacing in ("linspace", "trailing"):
        init = max_sigma
    else:
        init = np.sqrt(max_sigma * max_sigma + np.float32(1))
    return EulerState(timesteps=jnp.asarray(t.astype(np.float32)), sigmas=jnp.asarray(sigmas),
                      init_noise_sigma=jnp.asarray(np.float32(init)), config=config)


SamplerState = Union[DDIMState, EulerState]
SAMPLERS = {"ddim": ddim_set_timesteps, "euler": euler_set_timesteps}


def set_timesteps(config: SchedulerConfig, num_inference_steps: int, sampler: str = "ddim") -> SamplerState:
    """The sampling state for `sampler` ('ddim' or 'euler')."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; one of {sorted(SAMPLERS)}")
    return SAMPLERS[sampler](config, num_inference_steps)
