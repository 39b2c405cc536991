"""The component registries behind config files, `pejax components`, `--set` overrides and the README reference."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from pejax import config as cfg
from pejax import registry
from pejax.cli import apply_overrides
from pejax.cli import main
from pejax.data import load_texts
from pejax.run_config import build_embedding
from pejax.run_config import build_generator
from pejax.run_config import build_mesh
from pejax.run_config import check_private_stream
from pejax.run_config import load_dataset
from pejax.run_config import run_experiment

ROOT = pathlib.Path(__file__).resolve().parents[1]

EXPECTED = {
    "generator": {"glyphs", "flax-ddpm", "diffusers", "stable-diffusion", "causal-lm"},
    "embedding": {"pixels", "resize", "vision", "sentence"},
    "data": {"digits", "npz", "folder", "text"},
    "metric": {"accuracy", "frechet"},
}


def test_every_documented_name_is_registered():
    for reg, names in EXPECTED.items():
        assert names <= set(registry.names(reg)), reg


def test_components_cli_text_and_json(capsys):
    assert main(["components", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(json.dumps(registry.describe()))
    for reg, names in EXPECTED.items():
        listed = {c["name"]: c for c in doc[reg]}
        assert names <= set(listed)
    diffusers = {
        o["name"]: o for o in {c["name"]: c for c in doc["generator"]}["diffusers"]["options"]
    }
    assert diffusers["path"]["required"] and diffusers["eta"] == {
        "name": "eta",
        "required": False,
        "default": 0.0,
        "doc": "DDIM's eta (0: deterministic steps)",
    }
    assert {"privacy", "pe", "speed", "run", "evaluation"} == set(doc["sections"])
    speed = {o["name"] for o in doc["sections"]["speed"]}
    assert {"devices", "private_stream", "precision", "block_size"} <= speed
    assert main(["components"]) == 0
    out = capsys.readouterr().out
    for names in EXPECTED.values():
        for name in names:
            assert f"\n  {name}: " in out


def test_readme_reference_is_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert registry.readme_block(readme) == registry.markdown(), (
        "README.md's configuration reference is out of date: run `python -m pejax.registry README.md`."
    )
    # The block names every registered component and every key of every component.
    for reg in registry.REGISTRIES:
        for name in registry.names(reg):
            assert f"- `{name}`" in readme
            for opt in registry.get(reg, name).options:
                assert f"`{opt.name}`" in readme


@pytest.mark.parametrize(
    "section,match",
    [
        (
            {"generator": {"kind": "diffuser"}},
            r"unknown generator 'diffuser' \(did you mean 'diffusers'\?\)",
        ),
        (
            {"generator": {"kind": "glyphs", "image_sise": 8}},
            r"\[generator\] \(generator 'glyphs'\): 'image_sise' \(did you mean 'image_size'\?\)",
        ),
        (
            {"embedding": {"name": "sentense"}},
            r"unknown embedding 'sentense' \(did you mean 'sentence'\?\)",
        ),
        ({"embedding": {"name": "resize", "sise": [2, 2]}}, r"'sise' \(did you mean 'size'\?\)"),
        ({"data": {"source": "npzz"}}, r"unknown data 'npzz' \(did you mean 'npz'\?\)"),
        ({"data": {"source": "npz"}}, r"\[data\] \(data 'npz'\) needs path"),
        (
            {"data": {"source": "npz", "path": "x.npz", "group_id_key": "u"}},
            r"did you mean 'group_ids_key'",
        ),
        (
            {"evaluation": {"metrics": ["acuracy"]}},
            r"unknown metric 'acuracy' \(did you mean 'accuracy'\?\)",
        ),
        ({"evaluation": {"metric": ["accuracy"]}}, r"'metric' \(did you mean 'metrics'\?\)"),
        ({"generater": {}}, r"\[generater\] \(did you mean 'generator'\?\)"),
        ({"speed": {"device": 2}}, r"'device' \(did you mean 'devices'\?\)"),
        ({"run": {"sed": 1}}, r"'sed' \(did you mean 'seed'\?\)"),
    ],
)
def test_did_you_mean_everywhere(tmp_path, section, match):
    config = {"pe": {"num_classes": 10, "samples_per_iteration": 40, "iterations": 1}} | section
    with pytest.raises(ValueError, match=match):
        run_experiment(config, tmp_path / "out", progress=False, echo=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_modality_mismatch_is_refused_before_loading_models(tmp_path):
    base = {"pe": {"num_classes": 10, "samples_per_iteration": 40, "iterations": 1}}
    with pytest.raises(
        ValueError, match=r"generator kind 'causal-lm' makes texts but data.source 'digits'"
    ):
        run_experiment(
            base | {"generator": {"kind": "causal-lm", "path": "nowhere"}}, tmp_path / "o"
        )
    with pytest.raises(
        ValueError, match=r"embedding 'sentence' .* embeds texts but the data are images"
    ):
        build_embedding({"name": "sentence"}, (5, 8, 8, 1), "image")


def test_register_a_new_kind_is_one_function():
    calls = []

    @registry.register(
        "generator",
        "test-constant",
        doc="a test generator",
        modality="image",
        options=(
            registry.Option("value", 0.5, "pixel value"),
            registry.Option("size", registry.REQUIRED, "side"),
        ),
    )
    def _constant(opts, ctx):
        calls.append((opts, ctx.num_classes))
        return ("constant", opts["value"], opts["size"])

    try:
        assert "test-constant" in registry.names("generator")
        assert build_generator({"kind": "test-constant", "size": 4}, 3) == ("constant", 0.5, 4)
        assert calls == [({"value": 0.5, "size": 4}, 3)]
        assert "test-constant" in [c["name"] for c in registry.describe()["generator"]]
        with pytest.raises(ValueError, match="needs size"):
            build_generator({"kind": "test-constant"}, 3)
        with pytest.raises(ValueError, match="already registered"):
            registry.register("generator", "test-constant", doc="again")(_constant)
    finally:
        registry.unregister("generator", "test-constant")
    assert "test-constant" not in registry.names("generator")
    with pytest.raises(ValueError, match="unknown generator"):
        registry.get("generator", "test-constant")


def test_glyph_generator_options_reach_the_simulator():
    sim = build_generator(
        {"kind": "glyphs", "image_size": 8, "warp_grid": 3, "texts": ["a", "b"]}, 2
    )
    assert sim.image_size == 8 and sim.warp_grid == 3 and sim.texts == ("a", "b")
    with pytest.raises(ValueError, match=r"generator.texts has 2 entries but pe.num_classes is 3"):
        build_generator({"texts": ["a", "b"]}, 3)


def test_import_pejax_stays_light():
    code = (
        "import sys, pejax, pejax.registry, pejax.run_config, pejax.cli\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'flax', 'sentence_transformers',"
        " 'sklearn', 'matplotlib', 'PIL') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------ --set


def test_set_overrides_parse_toml_values():
    config = {"pe": {"iterations": 5}, "data": {"source": "digits"}}
    apply_overrides(
        config,
        [
            "pe.iterations=2",
            "pe.degrees=[0.5, 0.1]",
            "data.path=/tmp/x y/train",
            "generator.prior.warp=0.06",
            "privacy.user_level=true",
            'generator.kind="glyphs"',
        ],
    )
    assert config == {
        "pe": {"iterations": 2, "degrees": [0.5, 0.1]},
        "data": {"source": "digits", "path": "/tmp/x y/train"},
        "generator": {"prior": {"warp": 0.06}, "kind": "glyphs"},
        "privacy": {"user_level": True},
    }
    for bad, match in [
        ("pe", "section.key=value"),
        ("iterations=2", "section.key=value"),
        ("pee.iterations=2", r"\[pee\] \(did you mean 'pe'\?\)"),
        ("pe.iterations.x=1", "'iterations' is not a table"),
    ]:
        with pytest.raises(ValueError, match=match):
            apply_overrides({"pe": {"iterations": 5}}, [bad])


# ------------------------------------------------------------------------------------------------ data


def test_load_texts_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    rows = [
        {"text": "sunny day", "label": "weather", "user": "ann"},
        {"text": "a cat", "label": "animals", "user": "bob"},
        {"text": "rain again", "label": "weather", "user": "ann"},
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    d = load_texts(jsonl, group_column="user")
    assert d.texts == ["sunny day", "a cat", "rain again"]
    assert d.class_names == ("animals", "weather") and d.labels.tolist() == [1, 0, 1]
    assert d.labels.dtype == np.int32 and d.group_ids.tolist() == ["ann", "bob", "ann"]
    csv = tmp_path / "t.csv"
    csv.write_text('body,y\n"hello, world",1\nbye,0\n')
    d = load_texts(csv, text_column="body", label_column="y")
    assert d.texts == ["hello, world", "bye"] and d.labels.tolist() == [1, 0]
    assert d.class_names == ("0", "1") and d.group_ids is None
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"text": "dog", "label": "animals"}) + "\n")
    assert load_texts(test, class_names=("animals", "weather")).labels.tolist() == [0]
    test.write_text(json.dumps({"text": "dog", "label": "sports"}) + "\n")
    with pytest.raises(ValueError, match=r"labels \['sports'\] .* are not among the classes"):
        load_texts(test, class_names=("animals", "weather"))
    with pytest.raises(ValueError, match=r"row 1 of .* has no 'label' \(label_column\)"):
        load_texts(csv, text_column="body")
    (tmp_path / "t.txt").write_text("a text\n")
    with pytest.raises(ValueError, match=r"must end in .jsonl or .csv"):
        load_texts(tmp_path / "t.txt")
    with pytest.raises(FileNotFoundError):
        load_texts(tmp_path / "missing.jsonl")


def test_text_source_groups_and_encoding(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"text": t, "label": y, "user": u})
            for t, y, u in [("é" * 10, 0, "u2"), ("b", 1, "u1"), ("c", 1, "u1")]
        )
    )
    d = load_dataset({"source": "text", "path": str(path), "group_column": "user", "max_bytes": 5})
    assert d.modality == "text" and d.samples.shape == (3, 5) and d.samples.dtype == np.uint8
    assert bytes(d.samples[0]).rstrip(b"\0").decode() == "éé"  # cut on a character boundary
    assert d.group_ids.tolist() == [1, 0, 0] and d.class_names == ("0", "1")


def test_npz_group_ids(tmp_path):
    path = tmp_path / "d.npz"
    images = np.zeros((4, 8, 8), np.uint8)
    np.savez(path, images=images, labels=np.arange(4) % 2, users=np.array([3, 3, 7, 9]))
    d = load_dataset({"source": "npz", "path": str(path), "group_ids_key": "users"})
    assert d.group_ids.tolist() == [3, 3, 7, 9] and d.group_ids.dtype == np.int64
    with pytest.raises(KeyError, match=r"no array 'user' \(data.group_ids_key\)"):
        load_dataset({"source": "npz", "path": str(path), "group_ids_key": "user"})
    np.savez(path, images=images, labels=np.arange(4) % 2, users=np.arange(3))
    with pytest.raises(ValueError, match=r"one user id per private sample \(4,\)"):
        load_dataset({"source": "npz", "path": str(path), "group_ids_key": "users"})


def test_user_level_must_agree_with_the_data(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(
        path, images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4) % 2, users=np.arange(4)
    )
    base = {
        "data": {"source": "npz", "path": str(path), "group_ids_key": "users"},
        "pe": {"num_classes": 2, "samples_per_iteration": 8, "iterations": 1},
    }
    with pytest.raises(ValueError, match=r"privacy.user_level is false"):
        run_experiment(base | {"privacy": {"user_level": False}}, tmp_path / "o")
    del base["data"]["group_ids_key"]
    with pytest.raises(ValueError, match=r"privacy.user_level = true needs one user id"):
        run_experiment(base | {"privacy": {"user_level": True}}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ speed


def test_speed_devices_and_mesh():
    assert cfg.SpeedConfig(devices=1).devices == 1
    assert cfg.SpeedConfig(devices=[1, 1]).devices == (1, 1)
    for bad in (0, [2, 0], [], "2", True, 1.5):
        with pytest.raises(ValueError, match=r"speed.devices must be a device count"):
            cfg.SpeedConfig(devices=bad)
    mesh = build_mesh(1)
    assert mesh.devices.shape == (1,) and mesh.axis_names == ("data",)
    mesh = build_mesh((1, 1))
    assert mesh.devices.shape == (1, 1) and mesh.axis_names == ("data0", "data1")
    assert build_mesh(None) is None
    with pytest.raises(ValueError, match="needs 4096 devices but JAX sees"):
        build_mesh(4096)


def test_private_stream_is_checked(tmp_path):
    assert cfg.SpeedConfig(private_stream=tmp_path / "e.npy").private_stream == str(
        tmp_path / "e.npy"
    )
    with pytest.raises(TypeError, match=r"speed.private_stream must be the path"):
        cfg.SpeedConfig(private_stream=3)
    path = tmp_path / "e.npy"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_private_stream(str(path), 5)
    np.save(path, np.zeros((5, 3), np.float32))
    assert check_private_stream(str(path), 5) == (5, 3)
    with pytest.raises(ValueError, match="has 5 rows but \\[data\\] has 4 private samples"):
        check_private_stream(str(path), 4)
    np.save(path, np.zeros((5,), np.float32))
    with pytest.raises(ValueError, match="2-D float array"):
        check_private_stream(str(path), 5)
    np.save(path, np.zeros((5, 3), np.int32))
    with pytest.raises(ValueError, match="2-D float array"):
        check_private_stream(str(path), 5)


def test_builder_errors_name_the_table_and_the_component(tmp_path):
    with pytest.raises(
        ValueError, match=r"^\[generator\] \(generator 'glyphs'\): image_size must be"
    ):
        build_generator({"kind": "glyphs", "image_size": 2}, 2)
    with pytest.raises(FileNotFoundError, match=r"^\[data\] \(data 'folder'\): "):
        load_dataset({"source": "folder", "path": str(tmp_path / "nowhere")})
    with pytest.raises(
        ValueError, match=r"config section \[generator\] must be a table of keys, e\.g\. kind"
    ):
        build_generator("glyphs", 2)


@pytest.mark.parametrize(
    "blocked,generator,extra",
    [
        (("torch", "diffusers"), '{kind = "diffusers", path = "p"}', "diffusers"),
        (
            ("torch", "transformers"),
            '{kind = "causal-lm", path = "p", prompts = ["a", "b"]}',
            "text",
        ),
        (("flax",), '{kind = "flax-ddpm", path = "p"}', "flax"),
    ],
)
def test_a_missing_extra_names_it(tmp_path, blocked, generator, extra):
    data = 'data = {source = "text", path = "t.jsonl"}' if extra == "text" else ""
    if extra == "text":
        (tmp_path / "t.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    (tmp_path / "c.toml").write_text(
        f"generator = {generator}\n{data}\n[pe]\nnum_classes = {2 if extra == 'text' else 10}\n"
        "samples_per_iteration = 40\n"
    )
    # A finder that refuses the blocked packages, as if they were not installed.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from pejax.cli import main\n"
        "sys.exit(main(['run', 'c.toml', '--out', 'o']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert out.returncode == 1, out.stderr
    assert f"pip install 'pejax[{extra}]'" in out.stderr
    assert not (tmp_path / "o").exists()
