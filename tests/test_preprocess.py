"""Tests of downsampling and normalization (affine, dataset-wide GMM with per-micrograph scales)."""

import numpy as np
import pytest

from napari_pupick.errors import MicrographError, ModelError
from napari_pupick.preprocess import (
    GMM,
    Preprocessor,
    affine_normalize,
    downsample,
    estimate_scale,
    fit_gmm,
    gmm_normalize,
    mixture_curve,
    pixel_histogram,
)
from napari_pupick.synthetic import make_synthetic

TRUE = dict(p=0.3, mu0=4.0, mu1=10.0, s0=1.0, s1=2.0)


def sample_mixture(rng, shape, scale, p=TRUE["p"], mu0=TRUE["mu0"], mu1=TRUE["mu1"], s0=TRUE["s0"],
                   s1=TRUE["s1"]):
    """Pixels x = a * y, y from the mixture; also returns the component labels."""
    z = rng.random(shape) < p
    y = np.where(z, rng.normal(mu1, s1, shape), rng.normal(mu0, s0, shape))
    return (scale * y).astype(np.float32), z


@pytest.fixture(scope="module")
def mixture_set():
    rng = np.random.default_rng(1)
    scales = np.array([1.0, 1.6, 0.7, 1.2])
    images = [sample_mixture(rng, (200, 240), a)[0] for a in scales]
    return images, scales


# ------------------------------------------------------------------------------------------------ downsampling


@pytest.mark.parametrize("shape,factor,expected", [((101, 77), 2, (50, 38)), ((101, 77), 3, (33, 25)),
                                                   ((64, 64), 4, (16, 16)), ((95, 85), 5, (19, 17)),
                                                   ((7, 9), 7, (1, 1))])
def test_downsample_shapes(shape, factor, expected):
    out = downsample(np.random.default_rng(0).normal(size=shape), factor)
    assert out.shape == expected
    assert out.dtype == np.float32


def test_downsample_factor_one_is_float32_copy():
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    out = downsample(image, 1)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, image)
    out[0, 0] = 99
    assert image[0, 0] == 0


@pytest.mark.parametrize("factor", [0, -2, 1.5, 2.0, True, "2"])
def test_downsample_rejects_bad_factor(factor):
    with pytest.raises(ValueError):
        downsample(np.zeros((8, 8)), factor)


def test_downsample_rejects_nan_and_too_small():
    image = np.zeros((8, 8), np.float32)
    image[3, 3] = np.nan
    with pytest.raises(MicrographError, match="NaN"):
        downsample(image, 2)
    with pytest.raises(MicrographError, match="too small"):
        downsample(np.ones((3, 8)), 4)
    with pytest.raises(MicrographError, match="2-D"):
        downsample(np.ones((2, 3, 8)), 2)


@pytest.mark.parametrize("shape,factor", [((96, 80), 2), ((95, 85), 5), ((99, 75), 3), ((97, 83), 4)])
def test_downsample_keeps_low_frequency_sinusoid_and_mean(shape, factor):
    # A sinusoid with whole periods over the part of the image that is kept (a multiple of the factor): the binned
    # pixel (i, j) sits at original pixel (i * factor, j * factor), so it must equal the sinusoid there.
    h, w = (shape[0] // factor) * factor, (shape[1] // factor) * factor
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    ky, kx = 3, 2

    def wave(y, x):
        return 5.0 + 2.0 * np.cos(2 * np.pi * (ky * y / h + kx * x / w) + 0.3)

    out = downsample(wave(yy, xx), factor)
    oy, ox = np.mgrid[0 : h // factor, 0 : w // factor] * factor
    np.testing.assert_allclose(out, wave(oy, ox), atol=1e-4)
    assert abs(float(out.mean()) - 5.0) < 1e-4


def test_downsample_removes_what_the_binned_grid_cannot_hold():
    # A checkerboard (the input's Nyquist frequency) must vanish, where pixel skipping would keep a constant 1.
    yy, xx = np.mgrid[0:64, 0:48]
    checker = np.where((yy + xx) % 2 == 0, 1.0, -1.0) + 3.0
    out = downsample(checker, 2)
    np.testing.assert_allclose(out, 3.0, atol=1e-5)


def test_downsample_keeps_mean_of_random_image():
    rng = np.random.default_rng(3)
    image = rng.normal(7.0, 2.0, (120, 90)).astype(np.float32)
    out = downsample(image, 3)
    assert abs(float(out.mean()) - float(image.mean())) < 1e-4


# ------------------------------------------------------------------------------------------------ affine


def test_affine_normalize():
    rng = np.random.default_rng(0)
    out = affine_normalize(rng.normal(100.0, 7.0, (64, 64)))
    assert out.dtype == np.float32
    assert abs(float(out.mean())) < 1e-5
    assert abs(float(out.std()) - 1.0) < 1e-5
    with pytest.raises(MicrographError, match="constant"):
        affine_normalize(np.full((8, 8), 3.0))


# ------------------------------------------------------------------------------------------------ GMM


def test_gmm_recovers_parameters_and_scales(mixture_set):
    images, scales = mixture_set
    fit = fit_gmm(images)
    g = np.exp(np.mean(np.log(scales)))  # fitted units: scales have geometric mean 1, so y_fit = g * y_true
    assert fit.converged and not fit.collapsed
    assert abs(fit.gmm.p - TRUE["p"]) < 0.01
    assert fit.gmm.mu0 == pytest.approx(TRUE["mu0"] * g, rel=0.02)
    assert fit.gmm.mu1 == pytest.approx(TRUE["mu1"] * g, rel=0.02)
    assert fit.gmm.s0 == pytest.approx(TRUE["s0"] * g, rel=0.03)
    assert fit.gmm.s1 == pytest.approx(TRUE["s1"] * g, rel=0.03)
    assert np.exp(np.mean(np.log(fit.scales))) == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(fit.scales / fit.scales[0], scales / scales[0], rtol=0.01)
    # The likelihood never decreases (ECM) and is recorded per iteration.
    assert len(fit.loglik) == fit.n_iter
    assert np.all(np.diff(fit.loglik) > -1e-9)


def test_gmm_is_deterministic(mixture_set):
    images, _ = mixture_set
    a, b = fit_gmm(images), fit_gmm(images)
    assert a.gmm == b.gmm
    np.testing.assert_array_equal(a.scales, b.scales)
    assert a.loglik == b.loglik


def test_gmm_minority_component_first_and_from_init(mixture_set):
    images, _ = mixture_set
    # Swap the roles: the bright component dominant (p > 0.5 for component 1, the higher mean).
    rng = np.random.default_rng(5)
    imgs = [sample_mixture(rng, (150, 150), a, p=0.8)[0] for a in (1.0, 2.0)]
    fit = fit_gmm(imgs)
    assert fit.gmm.mu0 < fit.gmm.mu1
    assert fit.gmm.p == pytest.approx(0.8, abs=0.015)
    assert fit.gmm.dominant == (fit.gmm.mu1, fit.gmm.s1)
    # Starting from a given mixture reaches the same fit.
    again = fit_gmm(imgs, init=GMM(0.5, 1.0, 5.0, 1.0, 1.0))
    assert again.gmm.p == pytest.approx(fit.gmm.p, abs=1e-3)
    assert again.gmm.mu1 / again.gmm.s1 == pytest.approx(fit.gmm.mu1 / fit.gmm.s1, rel=1e-3)


def test_gmm_normalizes_a_new_micrograph(mixture_set):
    images, scales = mixture_set
    fit = fit_gmm(images)
    g = np.exp(np.mean(np.log(scales)))
    rng = np.random.default_rng(11)
    new, z = sample_mixture(rng, (300, 300), 2.5)
    a = estimate_scale(new, fit.gmm)
    assert a == pytest.approx(2.5 / g, rel=0.01)
    out = gmm_normalize(new, fit.gmm)
    assert out.dtype == np.float32 and out.shape == new.shape
    # The dominant component (component 0 here, p = 0.3) becomes standard normal.
    dominant = out[~z]
    assert abs(float(dominant.mean())) < 0.03
    assert abs(float(dominant.std()) - 1.0) < 0.03
    # With the scale given, the same formula x' = (x / a - mu) / s.
    mu, s = fit.gmm.dominant
    np.testing.assert_allclose(gmm_normalize(new, fit.gmm, scale=2.0), (new / 2.0 - mu) / s, rtol=1e-5, atol=1e-5)


def test_estimate_scale_agrees_with_joint_fit(mixture_set):
    images, _ = mixture_set
    fit = fit_gmm(images)
    for image, a in zip(images, fit.scales):
        assert estimate_scale(image, fit.gmm) == pytest.approx(a, rel=1e-4)


def test_gmm_unimodal_image_collapses_to_one_gaussian():
    rng = np.random.default_rng(2)
    image = rng.normal(50.0, 4.0, (256, 256)).astype(np.float32)
    fit = fit_gmm(image)
    assert fit.collapsed
    assert fit.gmm.p == 0.0 and fit.gmm.mu0 == fit.gmm.mu1 and fit.gmm.s0 == fit.gmm.s1
    out = gmm_normalize(image, fit.gmm, fit.scales[0])
    assert np.all(np.isfinite(out))
    assert abs(float(out.mean())) < 0.01
    assert abs(float(out.std()) - 1.0) < 0.01
    # A new image under the collapsed mixture normalizes too.
    out2 = gmm_normalize(rng.normal(100.0, 8.0, (64, 64)), fit.gmm)
    assert abs(float(out2.mean())) < 0.05 and abs(float(out2.std()) - 1.0) < 0.05


def test_gmm_quantized_pixels():
    # Integer grey levels (8-bit-like data): one bin per level; no component collapses onto a level.
    rng = np.random.default_rng(4)
    images = [np.round(sample_mixture(rng, (200, 200), a, mu0=40, mu1=70, s0=4, s1=6)[0]) for a in (1.0, 1.3)]
    centres, counts = pixel_histogram(images[0])
    np.testing.assert_array_equal(centres, np.round(centres))
    assert counts.sum() > 0.999 * images[0].size
    fit = fit_gmm(images)
    g = np.sqrt(1.3)
    assert fit.gmm.p == pytest.approx(0.3, abs=0.015)
    assert fit.gmm.mu0 == pytest.approx(40 * g, rel=0.02)
    assert fit.gmm.s0 == pytest.approx(4 * g, rel=0.05)
    assert fit.scales[1] / fit.scales[0] == pytest.approx(1.3, rel=0.01)


def test_gmm_rejects_constant_and_nan():
    with pytest.raises(MicrographError, match="constant"):
        fit_gmm(np.full((32, 32), 5.0))
    bad = np.ones((32, 32))
    bad[0, 0] = np.inf
    with pytest.raises(MicrographError, match="infinite"):
        fit_gmm([np.random.default_rng(0).normal(size=(32, 32)), bad])


def test_gmm_dominant_and_dict_round_trip():
    assert GMM(0.2, 1.0, 5.0, 0.5, 2.0).dominant == (1.0, 0.5)
    assert GMM(0.7, 1.0, 5.0, 0.5, 2.0).dominant == (5.0, 2.0)
    g = GMM(0.25, -1.0, 3.0, 0.5, 2.0)
    d = g.to_dict()
    assert all(type(v) is float for v in d.values())
    assert GMM.from_dict(d) == g
    with pytest.raises(ModelError):
        GMM.from_dict({"p": 0.5})
    with pytest.raises(ModelError):
        GMM(0.5, 0.0, 1.0, -1.0, 1.0)


def test_mixture_curve_matches_the_histogram(mixture_set):
    images, _ = mixture_set
    fit = fit_gmm(images)
    centres, density, pdf0, pdf1 = mixture_curve(images, fit.gmm, fit.scales, bins=200)
    width = centres[1] - centres[0]
    assert centres.shape == density.shape == pdf0.shape == pdf1.shape == (200,)
    assert density.sum() * width == pytest.approx(1.0, abs=0.01)
    assert (pdf0 + pdf1).sum() * width == pytest.approx(1.0, abs=0.01)
    assert pdf0.sum() * width == pytest.approx(1 - fit.gmm.p, abs=0.01)
    # Normalized units: the dominant component (0 here) is N(0, 1).
    assert centres[np.argmax(pdf0)] == pytest.approx(0.0, abs=width)
    assert np.abs(density - (pdf0 + pdf1)).sum() * width < 0.05
    # Without scales (estimated per image) the same picture.
    _, density2, _, _ = mixture_curve(images, fit.gmm, bins=200)
    assert np.abs(density2 - density).sum() * width < 0.01


# ------------------------------------------------------------------------------------------------ Preprocessor


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(n_micrographs=3, shape=(200, 260), n_particles=20, radius=10, seed=3)


def test_preprocessor_gmm(synthetic):
    pre = Preprocessor(downsample=2, method="gmm")
    with pytest.raises(ModelError, match="not been fit"):
        pre.transform(synthetic.micrographs[0])
    assert pre.fit(synthetic.micrographs) is pre
    assert isinstance(pre.gmm, GMM)
    out = pre.transform(synthetic.micrographs[1])
    assert out.shape == (100, 130) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    mixed = pre.fit_transform(synthetic.stack)
    assert len(mixed) == 3
    np.testing.assert_allclose(mixed[1], out, atol=1e-3)
    # Round trip through plain types.
    d = pre.to_dict()
    assert set(d) == {"downsample", "method", "gmm"}
    assert type(d["downsample"]) is int and type(d["method"]) is str
    assert all(type(v) is float for v in d["gmm"].values())
    pre2 = Preprocessor.from_dict(d)
    assert pre2 == pre
    np.testing.assert_array_equal(pre2.transform(synthetic.micrographs[1]), out)


def test_preprocessor_dict_survives_torch_weights_only(tmp_path, synthetic):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    pre = Preprocessor(downsample=2).fit(synthetic.micrographs[:2])
    path = tmp_path / "pre.pt"
    torch.save({"preprocess": pre.to_dict()}, path)
    loaded = torch.load(path, weights_only=True)
    assert Preprocessor.from_dict(loaded["preprocess"]) == pre


def test_preprocessor_affine_and_none(synthetic):
    image = synthetic.micrographs[0]
    aff = Preprocessor(downsample=2, method="affine").fit(synthetic.micrographs)
    out = aff.transform(image)
    assert out.shape == (100, 130)
    assert abs(float(out.mean())) < 1e-5 and abs(float(out.std()) - 1.0) < 1e-4
    raw = Preprocessor(downsample=1, method="none")
    np.testing.assert_array_equal(raw.transform(image), image.astype(np.float32))
    assert Preprocessor.from_dict(aff.to_dict()) == aff
    with pytest.raises(ValueError, match="unknown normalization"):
        Preprocessor(method="zscore")
    with pytest.raises(ValueError):
        Preprocessor(downsample=0)
    with pytest.raises(ModelError):
        Preprocessor.from_dict({"downsample": "x"})


def test_preprocessor_rejects_nan(synthetic):
    pre = Preprocessor(downsample=2).fit(synthetic.micrographs)
    bad = synthetic.micrographs[0].copy()
    bad[5, 5] = np.nan
    with pytest.raises(MicrographError, match="NaN"):
        pre.transform(bad)
    with pytest.raises(MicrographError, match="NaN"):
        Preprocessor(method="affine").transform(bad)


def test_gmm_on_real_micrographs(data_dir):
    import mrcfile

    paths = sorted((data_dir / "empiar10146_apoferritin" / "micrographs").glob("*.mrc"))[:2]
    images = [downsample(mrcfile.read(p), 4) for p in paths]
    fit = fit_gmm(images)
    assert not fit.collapsed and fit.converged
    assert np.all(np.diff(fit.loglik) > -1e-9)
    for image, a in zip(images, fit.scales):
        out = gmm_normalize(image, fit.gmm, a)
        assert np.all(np.isfinite(out))
        assert abs(float(np.median(out))) < 1.0


def test_accelerated_em_reaches_plain_em_optimum_in_fewer_steps(data_dir):
    """SQUAREM on a real micrograph (heavily overlapping components): the same likelihood as plain EM run far
    longer, the recorded likelihood never decreasing, and several times fewer steps."""
    import mrcfile

    from napari_pupick.preprocess import _em, _histogram

    path = sorted((data_dir / "empiar10146_apoferritin" / "micrographs").glob("*.mrc"))[0]
    image = downsample(mrcfile.read(path), 4)
    c, n, width = _histogram(image, 256)
    c, n = c[None], n[None]
    start = (np.array([1.0]), np.array([0.5, 0.5]), np.quantile(image, [0.25, 0.75]).astype(float),
             np.array([image.std(), image.std()], dtype=float) * 0.5)
    plain = _em(c, n, width, *start, max_iter=3000, tol=1e-9, accelerate=False)
    fast = _em(c, n, width, *start, max_iter=3000, tol=1e-9, accelerate=True)
    assert fast[6], "accelerated EM did not converge"
    assert np.all(np.diff(fast[4]) > -1e-12)
    assert fast[4][-1] >= plain[4][-1] - 1e-7
    assert fast[5] * 3 < plain[5]


def test_downsample_equals_cropping_the_full_spectrum():
    """The separable, pruned transform gives the numbers of cropping the whole 2-D spectrum."""
    from scipy import fft

    rng = np.random.default_rng(4)
    for shape, f in (((120, 124), 4), ((99, 64), 3), ((64, 50), 2)):
        x = rng.normal(size=shape).astype(np.float32)
        h, w = shape[0] // f, shape[1] // f
        spec = fft.rfft2(x[: h * f, : w * f].astype(np.float64))
        top, bottom = (h + 1) // 2, h // 2
        crop = np.concatenate([spec[:top, : w // 2 + 1], spec[h * f - bottom :, : w // 2 + 1]])
        if h % 2 == 0:
            crop[top] = 0.5 * (spec[top, : w // 2 + 1] + spec[h * f - bottom, : w // 2 + 1])
        expected = fft.irfft2(crop, s=(h, w)) / (f * f)
        np.testing.assert_allclose(downsample(x, f), expected, atol=1e-5)


def test_fit_transform_streams_an_iterator(synthetic):
    """An iterator of raw micrographs (read one by one) gives what the list gives, each raw image used once."""
    seen = []

    def reading():
        for im in synthetic.micrographs:
            seen.append(1)
            yield im

    streamed = Preprocessor(downsample=2).fit_transform(reading())
    listed = Preprocessor(downsample=2).fit_transform(list(synthetic.micrographs))
    assert len(seen) == len(synthetic.micrographs)
    for a, b in zip(streamed, listed):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(MicrographError, match="no micrographs"):
        Preprocessor(downsample=2).fit_transform(iter([]))


def test_gmm_with_a_large_offset():
    """float64 pixels around 1e8 with unit spread (a large offset): the fit keeps its precision (variances are
    computed from centred values, not as E[y^2] - E[y]^2)."""
    rng = np.random.default_rng(9)
    z = rng.random((256, 256)) < TRUE["p"]
    bright = rng.normal(TRUE["mu1"], TRUE["s1"], z.shape)
    image = 1e8 + np.where(z, bright, rng.normal(TRUE["mu0"], TRUE["s0"], z.shape))
    fit = fit_gmm(image)
    a = fit.scales[0]
    assert not fit.collapsed
    assert fit.gmm.p == pytest.approx(TRUE["p"], abs=0.02)
    assert (fit.gmm.mu1 - fit.gmm.mu0) * a == pytest.approx(6.0, rel=0.03)
    assert fit.gmm.s0 * a == pytest.approx(TRUE["s0"], rel=0.05)
    assert fit.gmm.s1 * a == pytest.approx(TRUE["s1"], rel=0.05)
