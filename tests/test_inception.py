"""Inception-v3 FID features: a random-weights network saved to disk, loaded through the public embedding and
through the config, and compared with an independent NumPy float64 forward pass (its own resize, convolutions,
pools and batch norms, written from the architecture's description, reading the same state dict)."""

import fractions
import json
import math

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

torch = pytest.importorskip(
    "torch", reason="needs the 'inception' extra: pip install 'pejax[inception]'"
)

from pejax import registry  # noqa: E402
from pejax.inception import FEATURE_DIM  # noqa: E402
from pejax.inception import InceptionEmbedding  # noqa: E402
from pejax.inception import build_inception_v3  # noqa: E402
from pejax.inception import load_inception_weights  # noqa: E402
from pejax.metrics import frechet_distance  # noqa: E402

# torchvision's published parameter count of inception_v3 (1000 classes, with the auxiliary classifier), and the
# auxiliary classifier's own parameters (conv0 1x1 768->128 + BN, conv1 5x5 128->768 + BN, fc 768->1000).
TORCHVISION_PARAMS = 27_161_264
AUX_PARAMS = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two fighting
    yield
    torch.set_num_threads(threads)


def _random_state(variant: str, seed: int, aux: bool = False) -> dict:
    """Random weights that keep activations of order one through the 94 layers (He-scaled convolutions)."""
    rng = np.random.default_rng(seed)
    shapes = {k: tuple(v.shape) for k, v in build_inception_v3(variant).state_dict().items()}
    if aux:
        for name, cin, cout, k in (("conv0", 768, 128, 1), ("conv1", 128, 768, 5)):
            shapes[f"AuxLogits.{name}.conv.weight"] = (cout, cin, k, k)
            for p in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"AuxLogits.{name}.bn.{p}"] = (cout,)
        shapes["AuxLogits.fc.weight"] = (1000, 768)
        shapes["AuxLogits.fc.bias"] = (1000,)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
            continue
        if key.endswith("conv.weight"):
            value = rng.normal(size=shape) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif key.endswith("bn.weight"):
            value = rng.uniform(0.8, 1.2, shape)
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("running_mean") or key.endswith("bn.bias"):
            value = rng.normal(0.0, 0.1, shape)
        else:  # fc
            value = rng.normal(0.0, 0.01, shape)
        state[key] = torch.tensor(value, dtype=torch.float32)
    return state


@pytest.fixture(scope="module")
def fid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(_random_state("fid", 0), path)
    return path


# ------------------------------------------------------------------------------- NumPy float64 reference


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights, half-pixel centres, source clamped at the borders, no antialiasing."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(np.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        m[i, lo] += 1.0 - frac
        m[i, hi] += frac
    return m


class _Reference:
    """Inception-v3 pool3 features in NumPy float64 from a state dict, NCHW."""

    def __init__(self, state: dict, variant: str):
        self.w = {k: v.double().numpy() for k, v in state.items()}
        self.variant = variant

    def unit(self, x, name, stride=1, pad=(0, 0)):
        """conv (no bias) -> batch norm (eps 1e-3, running statistics) -> ReLU."""
        w = self.w[f"{name}.conv.weight"]
        kh, kw = w.shape[2:]
        x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
        win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
        y = np.einsum("nchwij,ocij->nohw", win, w, optimize=True)
        bn = {p: self.w[f"{name}.bn.{p}"][None, :, None, None] for p in ("weight", "bias")}
        mean = self.w[f"{name}.bn.running_mean"][None, :, None, None]
        var = self.w[f"{name}.bn.running_var"][None, :, None, None]
        y = (y - mean) / np.sqrt(var + 1e-3) * bn["weight"] + bn["bias"]
        return np.maximum(y, 0.0)

    @staticmethod
    def maxpool(x, stride, pad=0):
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
        return sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::stride, ::stride].max(
            axis=(4, 5)
        )

    @staticmethod
    def avgpool(x, count_pad):
        """3x3, stride 1, zero padding 1; divided by 9 or by the number of real pixels in the window."""
        sums = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))
        sums = sums.sum(axis=(4, 5))
        if count_pad:
            return sums / 9.0
        ones = np.pad(np.ones(x.shape[2:]), 1)
        counts = sliding_window_view(ones, (3, 3)).sum(axis=(2, 3))
        return sums / counts

    def pool_branch(self, x, block, last=False):
        if self.variant == "fid" and last:
            return self.maxpool(x, 1, pad=1)
        return self.avgpool(x, count_pad=self.variant == "torchvision")

    def block_a(self, x, n):
        u = self.unit
        b1 = u(x, f"{n}.branch1x1")
        b5 = u(u(x, f"{n}.branch5x5_1"), f"{n}.branch5x5_2", pad=(2, 2))
        b3 = u(x, f"{n}.branch3x3dbl_1")
        b3 = u(u(b3, f"{n}.branch3x3dbl_2", pad=(1, 1)), f"{n}.branch3x3dbl_3", pad=(1, 1))
        bp = u(self.pool_branch(x, n), f"{n}.branch_pool")
        return np.concatenate([b1, b5, b3, bp], axis=1)

    def block_b(self, x, n):
        u = self.unit
        b3 = u(x, f"{n}.branch3x3", stride=2)
        bd = u(u(x, f"{n}.branch3x3dbl_1"), f"{n}.branch3x3dbl_2", pad=(1, 1))
        bd = u(bd, f"{n}.branch3x3dbl_3", stride=2)
        return np.concatenate([b3, bd, self.maxpool(x, 2)], axis=1)

    def block_c(self, x, n):
        u = self.unit
        row, col = (0, 3), (3, 0)  # paddings of the 1x7 and 7x1 convolutions
        b1 = u(x, f"{n}.branch1x1")
        b7 = u(
            u(u(x, f"{n}.branch7x7_1"), f"{n}.branch7x7_2", pad=row), f"{n}.branch7x7_3", pad=col
        )
        bd = u(x, f"{n}.branch7x7dbl_1")
        for i, pad in zip(range(2, 6), (col, row, col, row), strict=True):
            bd = u(bd, f"{n}.branch7x7dbl_{i}", pad=pad)
        bp = u(self.pool_branch(x, n), f"{n}.branch_pool")
        return np.concatenate([b1, b7, bd, bp], axis=1)

    def block_d(self, x, n):
        u = self.unit
        b3 = u(u(x, f"{n}.branch3x3_1"), f"{n}.branch3x3_2", stride=2)
        b7 = u(u(x, f"{n}.branch7x7x3_1"), f"{n}.branch7x7x3_2", pad=(0, 3))
        b7 = u(u(b7, f"{n}.branch7x7x3_3", pad=(3, 0)), f"{n}.branch7x7x3_4", stride=2)
        return np.concatenate([b3, b7, self.maxpool(x, 2)], axis=1)

    def block_e(self, x, n, last):
        u = self.unit
        b1 = u(x, f"{n}.branch1x1")
        b3 = u(x, f"{n}.branch3x3_1")
        b3 = [u(b3, f"{n}.branch3x3_2a", pad=(0, 1)), u(b3, f"{n}.branch3x3_2b", pad=(1, 0))]
        bd = u(u(x, f"{n}.branch3x3dbl_1"), f"{n}.branch3x3dbl_2", pad=(1, 1))
        bd = [u(bd, f"{n}.branch3x3dbl_3a", pad=(0, 1)), u(bd, f"{n}.branch3x3dbl_3b", pad=(1, 0))]
        bp = u(self.pool_branch(x, n, last), f"{n}.branch_pool")
        return np.concatenate([b1, *b3, *bd, bp], axis=1)

    def __call__(self, images):
        """images (N, H, W, C) in [0, 1] -> (N, 2048)."""
        x = np.asarray(images, np.float64)
        if x.shape[3] == 1:
            x = np.repeat(x, 3, axis=3)
        rh, rw = _resize_matrix(x.shape[1], 299), _resize_matrix(x.shape[2], 299)
        x = np.einsum("ih,nhwc,jw->ncij", rh, x, rw, optimize=True) * 2.0 - 1.0
        x = self.unit(x, "Conv2d_1a_3x3", stride=2)
        x = self.unit(self.unit(x, "Conv2d_2a_3x3"), "Conv2d_2b_3x3", pad=(1, 1))
        x = self.unit(self.unit(self.maxpool(x, 2), "Conv2d_3b_1x1"), "Conv2d_4a_3x3")
        x = self.maxpool(x, 2)
        for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
            x = self.block_a(x, n)
        x = self.block_b(x, "Mixed_6a")
        for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = self.block_c(x, n)
        x = self.block_d(x, "Mixed_7a")
        x = self.block_e(x, "Mixed_7b", last=False)
        x = self.block_e(x, "Mixed_7c", last=True)
        assert x.shape[1:] == (2048, 8, 8)
        return x.mean(axis=(2, 3))


def _close(got, want):
    got = np.asarray(got, np.float64)
    scale = np.abs(want).max()
    assert scale > 1e-2  # the random network keeps a signal to compare
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * scale)


# ------------------------------------------------------------------------------------------------ tests


def test_architecture_has_the_published_size():
    tv = sum(p.numel() for p in build_inception_v3("torchvision").parameters())
    assert tv + AUX_PARAMS == TORCHVISION_PARAMS
    fid = sum(p.numel() for p in build_inception_v3("fid").parameters())
    assert fid == tv + 8 * (FEATURE_DIM + 1)  # the FID network has 1008 classes instead of 1000
    with pytest.raises(ValueError, match="variant"):
        build_inception_v3("inception_v4")


@pytest.fixture(scope="module")
def grey_case(fid_file):
    """Two grey 17 x 23 images and their reference features under the weights of ``fid_file``."""
    images = np.random.default_rng(1).random((2, 17, 23, 1), dtype=np.float32)
    state, variant = load_inception_weights(fid_file)
    assert variant == "fid"
    return images, state, _Reference(state, "fid")(images)


def test_fid_features_from_the_config_match_the_reference(fid_file, grey_case):
    """Built by the registry as a config names it; two images in batches of one."""
    images, state, want = grey_case
    ctx = registry.BuildContext(0, (), (10, 17, 23, 1), "image")
    section = {"name": "inception", "path": str(fid_file), "batch_size": 1, "device": "cpu"}
    embed, label = registry.build("embedding", section, ctx, "[embedding]")
    assert label == "inception-fid:pt_inception-random.pth" == embed.__name__
    got = embed(images)
    assert got.shape == (2, FEATURE_DIM) and got.dtype == np.float32
    _close(got, want)
    # The comparison can fail: torchvision's pooling (pads counted, no max pool) gives other features.
    other = _Reference(state, "torchvision")(images[:1])
    assert np.abs(other - want[:1]).max() > 100 * 2e-4 * np.abs(want).max()


def test_rgb_copies_of_grey_images_in_one_batch_give_the_same_features(fid_file, grey_case):
    images, _, want = grey_case
    embed = InceptionEmbedding(fid_file, batch_size=5)
    assert embed.dim == FEATURE_DIM and embed.variant == "fid"
    _close(embed(np.repeat(images, 3, axis=3)), want)


@pytest.mark.slow
def test_torchvision_weights_downscaled_rgb_match_the_reference(tmp_path):
    """A torchvision state dict (1000 classes, auxiliary classifier included); two RGB 301 x 307 images."""
    path = tmp_path / "inception_v3_torchvision.pth"
    state = _random_state("torchvision", 2, aux=True)
    torch.save(state, path)
    embed = InceptionEmbedding(path, batch_size=8)
    assert embed.variant == "torchvision" and embed.__name__.startswith("inception-torchvision:")
    images = np.random.default_rng(3).random((2, 301, 307, 3), dtype=np.float32)
    _close(embed(images), _Reference(state, "torchvision")(images))


@pytest.mark.slow
def test_evaluation_computes_the_frechet_distance_in_inception_features(tmp_path, fid_file):
    """The digits demo config, tiny: the evaluation's [evaluation.embedding] names the inception weights."""
    from pejax.data import load_digits_split
    from pejax.run_config import DEMO_CONFIG
    from pejax.run_config import run_experiment

    d = load_digits_split()
    pick = np.flatnonzero(d.train_labels < 2)[:20]
    test_pick = np.r_[
        np.flatnonzero(d.test_labels == 0)[:2], np.flatnonzero(d.test_labels == 1)[:2]
    ]
    np.savez(tmp_path / "train.npz", images=d.train_images[pick], labels=d.train_labels[pick])
    np.savez(
        tmp_path / "test.npz", images=d.test_images[test_pick], labels=d.test_labels[test_pick]
    )
    config = json.loads(json.dumps(DEMO_CONFIG))
    config["data"] = {
        "source": "npz",
        "path": str(tmp_path / "train.npz"),
        "test_path": str(tmp_path / "test.npz"),
    }
    config["pe"].update(
        num_classes=2,
        samples_per_iteration=8,
        iterations=1,
        lookahead_degree=1,
        final_samples_per_class=2,
    )
    config["evaluation"] = {
        "metrics": ["frechet"],
        "embedding": {"name": "inception", "path": str(fid_file), "batch_size": 8, "device": "cpu"},
    }
    report = run_experiment(config, tmp_path / "out", progress=False, echo=lambda *a: None)
    assert report["config"]["evaluation"]["embedding"] == "inception-fid:pt_inception-random.pth"
    assert report["config"]["embedding"].startswith("resize")  # the votes keep their own embedding
    with np.load(tmp_path / "out" / "synthetic.npz", allow_pickle=False) as out:
        synthetic = out["images"]
    assert synthetic.shape == (
        4,
        16,
        16,
    )  # the glyph generator's size, saved without a channel axis
    # Reference: the features of the released images (as saved: uint8, so up to 1/510 per pixel off the
    # float images the evaluation saw) and of the held-out ones, by hand.
    embed = InceptionEmbedding(fid_file)
    released = synthetic[..., None].astype(np.float32) / 255
    want = frechet_distance(
        np.asarray(embed(released)), np.asarray(embed(d.test_images[test_pick]))
    )
    got = report["final_metrics"]["frechet_distance"]
    assert want > 0 and got == pytest.approx(want, rel=1e-2)


def test_bad_files_are_refused_with_the_file_named(tmp_path, fid_file):
    missing = tmp_path / "nothing.pth"
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth.*does not exist.*pt_inception"):
        InceptionEmbedding(missing)
    with pytest.raises(FileNotFoundError, match="is a folder"):
        InceptionEmbedding(tmp_path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match=r"cannot read .*junk\.pth.* as a PyTorch state dict"):
        InceptionEmbedding(junk)
    # Pickled code is refused (weights_only loading), and so is a mapping that holds no tensors.
    code = tmp_path / "code.pth"
    torch.save({"fc.weight": fractions.Fraction(1, 3)}, code)
    with pytest.raises(ValueError, match="cannot read"):
        load_inception_weights(code)
    plain = tmp_path / "plain.pth"
    torch.save({"fc.weight": 1}, plain)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_inception_weights(plain)
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    with pytest.raises(ValueError, match=r"no fc\.weight.*\(1008, 2048\)"):
        load_inception_weights(other)

    state = torch.load(fid_file, weights_only=True)
    del state["Mixed_6b.branch1x1.bn.running_var"]
    state["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(192, 2048, 3, 3)
    state["head.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(ValueError) as info:
        load_inception_weights(broken)
    msg = str(info.value)
    assert "broken.pth" in msg and "'fid'" in msg
    assert "missing keys Mixed_6b.branch1x1.bn.running_var" in msg
    assert "unexpected keys head.weight" in msg
    assert "Mixed_7c.branch_pool.conv.weight (192, 2048, 3, 3) (expected (192, 2048, 1, 1))" in msg

    state = torch.load(fid_file, weights_only=True)
    state["Conv2d_1a_3x3.conv.weight"][0, 0, 0, 0] = float("nan")
    nan = tmp_path / "nan.pth"
    torch.save(state, nan)
    with pytest.raises(ValueError, match=r"NaN or Inf values in Conv2d_1a_3x3\.conv\.weight"):
        load_inception_weights(nan)


def test_bad_images_and_options_are_refused(fid_file):
    embed = InceptionEmbedding(fid_file)
    images = np.zeros((2, 8, 8, 1), np.float32)
    images[1, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        embed(images)
    with pytest.raises(ValueError, match="channels"):
        embed(np.zeros((1, 8, 8, 4), np.float32))
    with pytest.raises(TypeError, match="floating"):
        embed(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        InceptionEmbedding(fid_file, batch_size=0)
    with pytest.raises(ValueError, match="device"):
        InceptionEmbedding(fid_file, device="toaster")


def test_config_errors_name_the_section():
    ctx = registry.BuildContext(0, (), (10, 8, 8, 1), "image")
    with pytest.raises(ValueError, match=r"\[embedding\].*needs path"):
        registry.build("embedding", {"name": "inception"}, ctx, "[embedding]")
    with pytest.raises(ValueError, match="did you mean 'inception'"):
        registry.build("embedding", {"name": "inceptoin", "path": "x"}, ctx, "[embedding]")
    with pytest.raises(
        FileNotFoundError, match=r"\[evaluation.embedding\] \(embedding 'inception'\)"
    ):
        registry.build(
            "embedding", {"name": "inception", "path": "nope.pth"}, ctx, "[evaluation.embedding]"
        )
    comp = registry.get("embedding", "inception")
    assert comp.extra == "inception" and comp.modality == "image"
    assert "inception" in registry.markdown()
