"""Scheduler parity with diffusers' PyTorch DDPM / DDIM / Euler schedulers (fp32, within 1e-6)."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cid_jax import schedulers as S

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-6


def _close(ours, ref, what, tol=TOL):
    """max |ours - ref| <= tol x max(1, max |ref|)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol} x scale {scale:.3g}"


def _close_trajectory(ours, ref, x_init, what, tol=TOL):
    """Step i within tol x the largest magnitude the float32 arithmetic has seen up to step i.

    A step's rounding error is relative to its inputs, not to its (possibly much smaller) output:
    Euler's first step from sigma_max (4096 with zero-SNR) cancels O(sigma) terms into O(1) ones.
    """
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    n = len(ref)
    inputs = np.concatenate([np.asarray(x_init, np.float64)[None], ref[:-1]]).reshape(n, -1)
    seen = np.maximum.accumulate(np.abs(inputs).max(1))
    scale = np.maximum(1.0, np.maximum(seen, np.abs(ref).reshape(n, -1).max(1)))
    err = np.abs(ours - ref).reshape(n, -1).max(1)
    worst = int(np.argmax(err / scale))
    assert np.all(err <= tol * scale), (f"{what}: step {worst}: max abs err {err[worst]:.3g} > "
                                        f"{tol} x scale {scale[worst]:.3g}")


def _ref(cls_name, raw, **overrides):
    return getattr(diffusers, cls_name).from_config({**raw, **overrides})


def _ours(cls_name, raw, **overrides):
    return S.SchedulerConfig.from_config(raw, cls_name, **overrides)


SD15 = S.SD15_SCHEDULER_CONFIG
SDXL = S.SDXL_SCHEDULER_CONFIG


def test_default_table_matches_diffusers_signatures():
    for name, table in S.DIFFUSERS_DEFAULTS.items():
        sig = inspect.signature(getattr(diffusers, name).__init__).parameters
        for key, value in table.items():
            assert key in sig and sig[key].default == value, (name, key, value)


@pytest.mark.parametrize("overrides", [
    {}, dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="squaredcos_cap_v2"),
])
def test_beta_tables(overrides):
    ref = _ref("DDPMScheduler", SD15, **overrides)
    betas, ac = S.betas_and_alphas_cumprod(_ours("DDPMScheduler", SD15, **overrides))
    assert betas.dtype == ac.dtype == np.float32
    np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=TOL, atol=1e-9)
    np.testing.assert_allclose(ac, ref.alphas_cumprod.numpy(), rtol=TOL, atol=1e-9)


def _zero_snr_error_bounds(plain_betas: np.ndarray, rescaled_betas: np.ndarray):
    """Worst-case float32 error of diffusers' zero-terminal-SNR rescale, per timestep, from the
    arithmetic (u = 2^-24, the float32 unit roundoff):

        s_t = sqrt(cumprod(1 - beta)_t)    relative error <= 2u (cumprod rounding, sqrt)
        d_t = (s_t - s_T) * c             relative error e_t <= 2u (s_t + s_T) / (s_t - s_T) + 2u
                                          (cancellation: s_t -> s_T as t -> T)
        abar_t = d_t^2                    relative error 2 e_t + u
        beta_t = 1 - abar_t / abar_{t-1}  absolute error <= alpha_t (2 e_t + 2 e_{t-1} + 3u) + u

    Two implementations that each stay within a bound differ by at most twice it. Which ulps a
    CPU rounds differently (vector width, libm) moves the error around inside the bound, so a
    fixed 1e-6 holds on one machine and fails on another (it reached 3.9e-6 at t = 992)."""
    u = 2.0 ** -24
    s = np.sqrt(np.cumprod(1.0 - plain_betas.astype(np.float64)))
    gap = s - s[-1]
    e = np.where(gap > 0, 2 * u * (s + s[-1]) / np.where(gap > 0, gap, 1.0) + 2 * u, np.inf)
    alpha = 1.0 - rescaled_betas.astype(np.float64)
    e_prev = np.concatenate([[0.0], e[:-1]])
    with np.errstate(invalid="ignore"):  # alpha_T = 0 exactly (beta_T = 1): only the last rounding
        beta_bound = np.where(alpha > 0, alpha * (2 * e + 2 * e_prev + 3 * u), 0.0) + u
        abar = np.cumprod(alpha)
        abar_bound = np.where(abar > 0, abar * (2 * e + 3 * u), 0.0) + u * abar.max()
    return 2 * beta_bound, 2 * abar_bound


def test_zero_terminal_snr_tables():
    """Zero-SNR betas are 1 - (ratio of nearly equal float32 numbers): diffusers' own rescale
    applied to *our* input betas must give our betas, and alphas_cumprod (what the samplers and
    the loss use) must match diffusers', within the float32 error bound of that arithmetic
    (`_zero_snr_error_bounds`), on any CPU."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    plain, _ = S.betas_and_alphas_cumprod(_ours("DDPMScheduler", SD15))
    betas, ac = S.betas_and_alphas_cumprod(_ours("DDPMScheduler", SD15, rescale_betas_zero_snr=True))
    expected = rescale_zero_terminal_snr(torch.from_numpy(plain.copy())).numpy()
    beta_tol, ac_tol = _zero_snr_error_bounds(plain, expected)
    err = np.abs(betas.astype(np.float64) - expected)
    worst = int(np.argmax(err / beta_tol))
    assert np.all(err <= beta_tol), f"betas: t={worst}: err {err[worst]:.3g} > bound {beta_tol[worst]:.3g}"
    ref = _ref("DDPMScheduler", SD15, rescale_betas_zero_snr=True).alphas_cumprod.numpy()
    err = np.abs(ac.astype(np.float64) - ref)
    worst = int(np.argmax(err / ac_tol))
    assert np.all(err <= ac_tol), f"alphas_cumprod: t={worst}: err {err[worst]:.3g} > bound {ac_tol[worst]:.3g}"
    assert ac[-1] == 0.0 and betas[-1] == 1.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_noise_velocity_and_target(prediction_type):
    ref = _ref("DDPMScheduler", SD15, prediction_type=prediction_type)
    sched = S.NoiseSchedule.create(_ours("DDPMScheduler", SD15, prediction_type=prediction_type))
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(6, 8, 8, 4)).astype(np.float32)
    noise = rng.normal(size=x0.shape).astype(np.float32)
    t = np.array([0, 1, 250, 500, 998, 999])
    tt, x0t, nt = torch.from_numpy(t), torch.from_numpy(x0), torch.from_numpy(noise)
    add = jax.jit(S.add_noise)(sched, x0, noise, jnp.asarray(t, jnp.int32))
    _close(add, ref.add_noise(x0t, nt, tt).numpy(), "add_noise")
    vel = S.get_velocity(sched, x0, noise, t)
    _close(vel, ref.get_velocity(x0t, nt, tt).numpy(), "velocity")
    target = S.training_target(sched, x0, noise, t)
    np.testing.assert_array_equal(target, vel if prediction_type == "v_prediction" else noise)
    ts = S.sample_timesteps(jax.random.key(0), 4096, sched)
    assert ts.dtype == jnp.int32 and int(ts.min()) >= 0 and int(ts.max()) <= 999


def _fake_model(n, shape, seed=0):
    """model_output_i = a_i * x + b_i: depends on the sample, identical arithmetic in both frameworks."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-0.5, 0.5, n).astype(np.float32)
    b = rng.normal(size=(n,) + shape).astype(np.float32)
    return a, b


def _ref_trajectory(ref, x, a, b, eta=None, noises=None):
    xs, x0s = [], []
    x = torch.from_numpy(x)
    for i, t in enumerate(ref.timesteps):
        inp = ref.scale_model_input(x, t)
        out = float(a[i]) * inp + torch.from_numpy(b[i])
        kw = {} if eta is None else dict(eta=eta, variance_noise=torch.from_numpy(noises[i]))
        res = ref.step(out, t, x, **kw)
        x = res.prev_sample
        xs.append(x.numpy().copy())
        x0s.append(res.pred_original_sample.numpy().copy())
    return np.stack(xs), np.stack(x0s)


def _our_trajectory(state, x, a, b, eta=0.0, noises=None, forced=None):
    """The sampling loop as a jitted lax.scan: the step index is traced.

    With `forced` [n, ...] (the reference's input sample at each step), every step starts from the
    reference's sample: the per-step error without propagation.
    """
    def body(x, inputs):
        i, ai, bi, ni, xi = inputs
        x = x if forced is None else xi
        out = ai * state.scale_model_input(x, i) + bi
        res = state.step(out, i, x) if noises is None else state.step(out, i, x, eta=eta, noise=ni)
        return res.prev_sample, (res.prev_sample, res.pred_original_sample)

    n = len(a)
    ns = np.zeros_like(b) if noises is None else noises
    xf = np.zeros_like(b) if forced is None else forced
    _, (xs, x0s) = jax.jit(lambda x: jax.lax.scan(body, x, (jnp.arange(n), a, b, ns, xf)))(x)
    return np.asarray(xs), np.asarray(x0s)


def _check_sampler(state, ref, x, n, name, seed):
    a, b = _fake_model(n, x.shape, seed=seed)
    ref_xs, ref_x0s = _ref_trajectory(ref, x, a, b)
    xs, x0s = _our_trajectory(state, x, a, b)
    _close_trajectory(xs, ref_xs, x, f"{name}: samples")
    _close_trajectory(x0s, ref_x0s, x, f"{name}: x0 predictions")
    ref_inputs = np.concatenate([x[None], ref_xs[:-1]])
    xs, x0s = _our_trajectory(state, x, a, b, forced=ref_inputs)
    for i in range(n):  # one step from the reference's sample: scale = that step's magnitudes
        _close(xs[i], ref_xs[i], f"{name}: step {i} from the reference input",
               tol=TOL * max(1.0, float(np.abs(ref_inputs[i]).max())))
        _close(x0s[i], ref_x0s[i], f"{name}: x0 at step {i} from the reference input",
               tol=TOL * max(1.0, float(np.abs(ref_inputs[i]).max())))


DDIM_CASES = [
    ("sd15 leading", SD15, {}, 10),
    ("sd15 leading 20", SD15, {}, 20),
    ("diffusers defaults, clipped", {}, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                             beta_end=0.012), 15),
    ("trailing v zero-snr", SD15, dict(timestep_spacing="trailing", prediction_type="v_prediction",
                                       rescale_betas_zero_snr=True), 12),
    ("linspace sample", SD15, dict(timestep_spacing="linspace", prediction_type="sample"), 13),
]


@pytest.mark.parametrize("name,raw,overrides,n", DDIM_CASES, ids=[c[0] for c in DDIM_CASES])
def test_ddim_matches_diffusers(name, raw, overrides, n):
    ref = _ref("DDIMScheduler", raw, **overrides)
    ref.set_timesteps(n)
    state = S.set_timesteps(_ours("DDIMScheduler", raw, **overrides), n, "ddim")
    np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
    assert state.timesteps.dtype == jnp.int32 and float(state.init_noise_sigma) == ref.init_noise_sigma
    x = np.random.default_rng(1).normal(size=(2, 4, 8, 8)).astype(np.float32)
    _check_sampler(state, ref, x, n, f"DDIM {name}", seed=0)


def test_ddim_eta_with_given_noise():
    ref = _ref("DDIMScheduler", SD15)
    ref.set_timesteps(10)
    state = S.set_timesteps(_ours("DDIMScheduler", SD15), 10, "ddim")
    x = np.random.default_rng(2).normal(size=(2, 4, 8, 8)).astype(np.float32)
    a, b = _fake_model(10, x.shape, seed=3)
    noises = np.random.default_rng(4).normal(size=b.shape).astype(np.float32)
    ref_xs, _ = _ref_trajectory(ref, x, a, b, eta=0.7, noises=noises)
    xs, _ = _our_trajectory(state, x, a, b, eta=0.7, noises=noises)
    _close_trajectory(xs, ref_xs, x, "DDIM eta=0.7")
    with pytest.raises(ValueError, match="noise"):
        state.step(jnp.asarray(b[0]), 0, jnp.asarray(x), eta=0.5)


EULER_CASES = [
    ("sd15 raw (linspace, as diffusers)", SD15, {}, 10),
    ("sd15 leading", SD15, dict(timestep_spacing="leading"), 20),
    ("sdxl leading", SDXL, {}, 15),
    ("trailing v", SD15, dict(timestep_spacing="trailing", prediction_type="v_prediction"), 12),
    ("sigma_min final", SDXL, dict(final_sigmas_type="sigma_min"), 11),
    ("zero-snr v trailing", SD15, dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                       timestep_spacing="trailing"), 10),
    ("linear betas, sample", {}, dict(prediction_type="sample"), 7),
]


@pytest.mark.parametrize("name,raw,overrides,n", EULER_CASES, ids=[c[0] for c in EULER_CASES])
def test_euler_matches_diffusers(name, raw, overrides, n):
    ref = _ref("EulerDiscreteScheduler", raw, **overrides)
    ref.set_timesteps(n)
    state = S.set_timesteps(_ours("EulerDiscreteScheduler", raw, **overrides), n, "euler")
    assert state.timesteps.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(state.timesteps), ref.timesteps.numpy(), rtol=TOL)
    np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=TOL)
    np.testing.assert_allclose(float(state.init_noise_sigma), float(ref.init_noise_sigma), rtol=TOL)
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(2, 4, 8, 8)) * float(ref.init_noise_sigma)).astype(np.float32)
    _check_sampler(state, ref, x, n, f"Euler {name}", seed=6)


def test_config_reading_and_errors():
    cfg = _ours("DDIMScheduler", SD15)
    assert cfg == S.SchedulerConfig()  # the dataclass defaults are SD1.5 as DDIM reads it
    assert _ours("EulerDiscreteScheduler", SD15).timestep_spacing == "linspace"
    assert _ours("EulerDiscreteScheduler", SDXL).timestep_spacing == "leading"
    with pytest.raises(NotImplementedError, match="use_karras_sigmas"):
        _ours("EulerDiscreteScheduler", SDXL, use_karras_sigmas=True)
    with pytest.raises(NotImplementedError, match="thresholding"):
        _ours("DDIMScheduler", {"thresholding": True})
    with pytest.raises(ValueError, match="timestep_spacing"):
        _ours("DDIMScheduler", SD15, timestep_spacing="karras")
    with pytest.raises(TypeError, match="timestep_spaceing"):
        _ours("DDIMScheduler", SD15, timestep_spaceing="leading")
    with pytest.raises(ValueError, match="unknown scheduler"):
        _ours("PNDMScheduler", SD15)
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.set_timesteps(cfg, 1001, "ddim")
    with pytest.raises(ValueError, match="unknown sampler"):
        S.set_timesteps(cfg, 10, "heun")
