"""The OpenAI-compatible generator against a real `transformers serve` on 127.0.0.1, with a fault-injecting proxy.

Server tests build a tiny GPT-2 chat model, start `transformers serve` on it as a subprocess (module fixture), and
talk to it directly or through tests/_fault_proxy.FaultProxy, which injects 429 (Retry-After), 500, slow answers,
dropped connections and bad completions, counts every request and can demand an API key.
"""

import collections
import itertools
import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fault_proxy import FaultProxy
from _fault_proxy import TransformersServer
from _fault_proxy import body_hash
from _fault_proxy import build_tiny_chat_lm

from pejax import checkpoint as ckpt
from pejax import registry
from pejax.config import PEConfig
from pejax.config import PrivacyConfig
from pejax.config import SpeedConfig
from pejax.config import load_config_file
from pejax.generators import GeneratorError
from pejax.generators.openai_chat import APIRequestRejectedError
from pejax.generators.openai_chat import APIUnavailableError
from pejax.generators.openai_chat import CompletionError
from pejax.generators.openai_chat import OpenAIChatGenerator
from pejax.generators.openai_chat import dry_run
from pejax.generators.text_codec import decode_texts
from pejax.generators.text_codec import encode_texts
from pejax.registry import BuildContext
from pejax.runner import PrivateEvolution

pytest.importorskip("httpx2", reason="needs pejax[api]")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "openai_chat_text.toml"
PROMPTS = ["Write a sentence about the weather.", "Write a sentence about animals."]
SECRET = "sk-pejax-test-" + "5f1d0c7e9a2b4c6d8e0f1a3b5c7d9e1f"


def gen_for(url, **kw):
    kw.setdefault("max_tokens", 24)
    kw.setdefault("max_bytes", 96)
    kw.setdefault("backoff_s", 0.05)
    kw.setdefault("max_backoff_s", 0.5)
    if isinstance(url, list):
        return OpenAIChatGenerator(model=kw.pop("model"), prompts=PROMPTS, endpoints=url, **kw)
    return OpenAIChatGenerator(model=kw.pop("model"), prompts=PROMPTS, base_url=url, **kw)


# ---------------------------------------------------------------------------------------------- no server


def _build(section, num_classes=2):
    ctx = BuildContext(num_classes, tuple(str(i) for i in range(num_classes)), (1, 8), "text")
    return registry.build("generator", section, ctx, "[generator]")


def test_config_errors_name_the_key_and_never_echo_a_secret(monkeypatch, tmp_path):
    base = {
        "kind": "openai-chat",
        "model": "m",
        "prompts": PROMPTS,
        "base_url": "http://127.0.0.1:9/v1",
    }
    with pytest.raises(ValueError, match=r"unknown key\(s\).*'api_key' \(did you mean") as e:
        _build({**base, "api_key": SECRET})
    assert SECRET not in str(e.value)
    with pytest.raises(ValueError, match="an API key itself is never accepted in a config") as e:
        _build({**base, "base_url": None, "endpoints": [{"base_url": "x", "api_key": SECRET}]})
    assert SECRET not in str(e.value)
    with pytest.raises(ValueError, match=r"'temprature' \(did you mean 'temperature'"):
        _build({**base, "temprature": 1.0})
    with pytest.raises(ValueError, match=r"needs model"):
        _build({k: v for k, v in base.items() if k != "model"})
    with pytest.raises(ValueError, match=r"pe\.num_classes is 3"):
        _build(base, 3)
    monkeypatch.delenv("PEJAX_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="PEJAX_NO_SUCH_KEY named by api_key_env is not set"):
        _build({**base, "api_key_env": "PEJAX_NO_SUCH_KEY"})
    with pytest.raises(ValueError, match=r"api_key_file .* does not exist"):
        _build({**base, "api_key_file": str(tmp_path / "nokey")})
    with pytest.raises(ValueError, match="not both"):
        _build({**base, "api_key_env": "A", "api_key_file": "b"})
    with pytest.raises(ValueError, match="base_url must be an http"):
        _build({**base, "base_url": "127.0.0.1:8000"})
    with pytest.raises(ValueError, match=r"temperature must lie in \[0.0, 2.0\]"):
        _build({**base, "temperature": 3})
    with pytest.raises(ValueError, match="on_truncated"):
        _build({**base, "on_truncated": "drop"})
    with pytest.raises(ValueError, match=r"random_template must contain the field \{prompt\}"):
        _build({**base, "random_template": "hello"})
    with pytest.raises(ValueError, match="may only use the fields"):
        _build({**base, "random_template": "{prompt} {topic}"})
    with pytest.raises(ValueError, match=r"extra_body must not set \['seed'\]"):
        _build({**base, "extra_body": {"seed": 1}})
    # Class names fill prompt_template when prompts is unset.
    g = _build(
        {k: v for k, v in base.items() if k != "prompts"} | {"prompt_template": "About {name}:"}
    )
    assert g.prompts == ("About 0:", "About 1:")
    # A key read from a file never shows in the generator's repr, name or endpoint list.
    (tmp_path / "key").write_text(SECRET + "\n")
    g = _build({**base, "api_key_file": str(tmp_path / "key")})
    assert SECRET not in repr(g) + g.name + json.dumps(g.endpoints)
    assert "file" in g.endpoints[0]["key_source"]


def test_shape_only_evaluation_sends_nothing():
    # Port 9 (discard) on loopback: any request would fail; eval_shape must not send one.
    g = gen_for("http://127.0.0.1:9/v1", model="m", max_retries=0)
    out = jax.eval_shape(lambda k: g.random(k, 0, 3), jax.random.key(0))
    assert out.shape == (3, 96) and out.dtype == jnp.uint8
    assert g.usage()["requests"] == 0


def test_dry_run_prints_every_random_request_and_the_count():
    config = load_config_file(EXAMPLE)
    config["data"]["path"] = str(ROOT / config["data"]["path"])
    lines = []
    plan = dry_run(config, echo=lines.append)
    bodies = [json.loads(x) for x in lines if not x.startswith("#")]
    assert bodies == plan["random_requests"] and len(bodies) == 16
    assert plan["counts"] == {0: 16, 1: 16, 2: 16} and plan["total"] == 48 and not plan["exact"]
    assert any("total: at most 48 request(s)" in x for x in lines)
    # Per class: 8 requests with the class prompt, distinct seeds, fills drawn from the configured list.
    styles = set(config["generator"]["random_fills"]["style"])
    for y, chunk in enumerate((bodies[:8], bodies[8:])):
        assert len({b["seed"] for b in chunk}) == 8
        for b in chunk:
            text = b["messages"][0]["content"]
            assert text.startswith(PROMPTS[y]) and text[len(PROMPTS[y]) + 1 :] in styles
    assert dry_run(config, echo=lambda s: None)["random_requests"] == bodies  # deterministic
    config["run"] = {"seed": 1}
    assert dry_run(config, echo=lambda s: None)["random_requests"] != bodies


# ---------------------------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    for mod in ("fastapi", "uvicorn", "openai", "torch", "transformers"):
        pytest.importorskip(mod, reason="needs pejax[serve]")
    folder = tmp_path_factory.mktemp("chat-lm")
    build_tiny_chat_lm(folder / "model")
    srv = TransformersServer(folder / "model", folder / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def proxies():
    made = []

    def make(upstream, **kw):
        p = FaultProxy(upstream, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def _toy_text_embedding(samples):
    """Hashed character-bigram counts, normalised: a cheap deterministic text embedding for loop tests."""
    texts = decode_texts(samples)
    out = np.zeros((len(texts), 64), np.float32)
    for i, t in enumerate(texts):
        for a, b in itertools.pairwise(t):
            out[i, (ord(a) * 31 + ord(b)) % 64] += 1.0
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)
    return jnp.asarray(out)


def _pe_run(gen, checkpoint_dir=None, callbacks=(), resume=False):
    corpus = [
        "rain falls on the old town",
        "the cat sat on the mat",
        "the sun is warm today",
        "a dog runs in the park",
        "the river flows to the sea",
        "birds sing in the morning",
    ]
    runner = PrivateEvolution(
        generator=gen,
        embedding=_toy_text_embedding,
        pe=PEConfig(
            num_classes=2,
            samples_per_iteration=16,
            iterations=2,
            degrees=(0.5, 0.3),
            variation_folds=2,
        ),
        # noise_seed: the same DP noise in every run (not DP), so that separate runs can be compared.
        privacy=PrivacyConfig(
            epsilon=None,
            noise_multiplier=1.0,
            delta=1e-3,
            class_proportions=(0.5, 0.5),
            noise_seed=0,
        ),
        speed=SpeedConfig(retry_backoff_s=0.0),
        checkpoint_dir=checkpoint_dir,
        callbacks=callbacks,
    )
    private = encode_texts(corpus * 2, 96)
    labels = np.array([0, 1] * 6, np.int32)
    return runner.run(jax.random.key(0), private, labels, resume=resume)


@pytest.mark.slow
def test_requests_are_deterministic_cached_and_seeded(server, proxies, tmp_path):
    proxy = proxies(server.url)
    cache = tmp_path / "cache.sqlite"
    g = gen_for(proxy.url, model=server.model, cache_path=cache, max_concurrency=1)
    key = jax.random.key(3)
    a = g.random(key, 0, 6)
    texts = g.to_texts(a)
    assert all(t.strip() for t in texts) and len(proxy.log) == 6 + g.usage()["repairs"]
    # The same key again, from a new generator on the same cache file: answers come from the cache.
    g2 = gen_for(proxy.url, model=server.model, cache_path=cache, max_concurrency=1)
    np.testing.assert_array_equal(np.asarray(g2.random(key, 0, 6)), np.asarray(a))
    n0 = len(proxy.log)
    assert g2.usage()["cache_hits"] == n0 and g2.usage()["requests"] == 0
    # Sample i depends on fold_in(key, i) only: a shorter call is a prefix.
    np.testing.assert_array_equal(np.asarray(g2.random(key, 0, 4)), np.asarray(a[:4]))
    # Degree 0 sends nothing; degree 0.5 sends one request a sample and keeps unmasked words.
    np.testing.assert_array_equal(np.asarray(g2.variation(key, a, 0, 0.0)), np.asarray(a))
    assert len(proxy.log) == n0
    v = g2.variation(key, a, 0, 0.5)
    # (a completion cut at max_tokens is re-requested with another seed: a repair)
    assert len(proxy.log) == n0 + 6 + g2.usage()["repairs"] and all(
        t.strip() for t in g2.to_texts(v)
    )
    sent = [body_hash(b) for b in g2.random_requests(key, 0, 6)]
    assert set(sent) <= {r["hash"] for r in proxy.log[:n0]}
    # Seeds reach the server: without a cache and one request at a time, the same key gives the same texts
    # (the server samples with torch.manual_seed(seed)), another key other texts.
    fresh = [gen_for(server.url, model=server.model, max_concurrency=1) for _ in range(2)]
    k = jax.random.key(11)
    t1, t2 = (
        fresh[0].to_texts(fresh[0].random(k, 1, 8)),
        fresh[1].to_texts(fresh[1].random(k, 1, 8)),
    )
    assert t1 == t2
    assert fresh[0].to_texts(fresh[0].random(jax.random.key(12), 1, 8)) != t1
    u = fresh[0].usage()
    assert (
        u["requests"] == 16 + u["repairs"] and u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
    )


@pytest.mark.slow
def test_pe_run_under_faults_equals_the_fault_free_run(server, proxies, tmp_path):
    common = {
        "model": server.model,
        "temperature": 0.0,
        "max_concurrency": 8,
        "on_truncated": "keep",
    }
    clean = gen_for(server.url, cache_path=tmp_path / "clean.sqlite", **common)
    want = _pe_run(clean)
    assert clean.usage()["failed_attempts"] == 0
    p1 = proxies(
        server.url,
        seed=1,
        rates={"429": 0.1, "500": 0.1, "slow": 0.1, "drop": 0.1},
        retry_after=0.3,
        slow_s=2.0,
    )
    p2 = proxies(
        server.url, seed=2, rates={"429": 0.05, "500": 0.05, "drop": 0.05}, retry_after=0.3
    )
    faulty = gen_for(
        [{"base_url": p1.url}, {"base_url": p2.url}],
        cache_path=tmp_path / "faulty.sqlite",
        timeout_s=1.0,
        max_retries=12,
        **common,
    )
    got = _pe_run(faulty)
    np.testing.assert_array_equal(np.asarray(got.samples), np.asarray(want.samples))
    np.testing.assert_array_equal(got.labels, want.labels)
    u = faulty.usage()
    for kind in ("rate_limited", "server_errors", "timeouts", "dropped"):
        assert u[kind] > 0, (kind, u)
    assert (
        u["failed_attempts"]
        == u["retries"]
        == sum(u[k] for k in ("rate_limited", "server_errors", "timeouts", "dropped", "malformed"))
    )
    assert u["answers"] == clean.usage()["answers"]
    assert u["requests"] == u["answers"] + u["failed_attempts"] == len(p1.log) + len(p2.log)
    # Least-loaded balancing stays exact through failures: nothing is left counted in flight, and the two
    # endpoints share the work.
    eps = faulty.endpoints
    assert [e["in_flight"] for e in eps] == [0, 0]
    assert min(e["sent"] for e in eps) >= 0.25 * u["requests"], eps
    assert [e["sent"] for e in eps] == [len(p1.log), len(p2.log)]


@pytest.mark.slow
def test_bad_completions_are_repaired_or_fail_clearly(server, proxies):
    rates = {"empty": 0.15, "refused": 0.15, "length": 0.15, "non_text": 0.15}
    proxy = proxies(server.url, content_rates=rates)
    # 60% of answers are spoiled by the proxy and the tiny model itself may stop at max_tokens, so a sample can
    # need many repairs: with 8 a CI run once exhausted them (9 bad answers in a row). 60 repairs make that
    # chance negligible (< 0.85^61 per sample) without changing what is checked.
    g = gen_for(proxy.url, model=server.model, max_concurrency=4, max_repairs=60, max_tokens=48)
    texts = g.to_texts(g.random(jax.random.key(0), 1, 24))
    assert all(t.strip() for t in texts)
    injected = collections.Counter(
        r["outcome"].split("+")[1] for r in proxy.log if "+" in r["outcome"]
    )
    assert all(injected[k] > 0 for k in rates), injected
    # What each answer the proxy served was, in the documented order of checks: refused, non-text, empty,
    # truncated (the server itself may also end at once or cut at max_tokens).
    served = collections.Counter()
    for r in proxy.log:
        fault = r["outcome"].split("+")[1] if "+" in r["outcome"] else None
        if fault in ("refused", "non_text"):
            served[fault] += 1
        elif fault == "empty" or r["server_empty"]:
            served["empty"] += 1
        elif fault == "length" or r["server_finish"] == "length":
            served["truncated"] += 1
    u = g.usage()
    for kind in ("refused", "non_text", "empty", "truncated"):
        assert u[kind] == served[kind], (kind, u, served)
    # Every bad answer was repaired with another request seed.
    assert u["repairs"] == u["empty"] + u["refused"] + u["truncated"] + u["non_text"]
    assert u["requests"] == 24 + u["repairs"]

    always_empty = proxies(server.url, content_rates={"empty": 1.0})
    g = gen_for(always_empty.url, model=server.model, max_repairs=2)
    with pytest.raises(
        CompletionError, match=r"no usable text in 3 answer\(s\).*empty, empty, empty"
    ):
        g.random(jax.random.key(0), 0, 2)
    always_cut = proxies(server.url, content_rates={"length": 1.0})
    g = gen_for(always_cut.url, model=server.model, on_truncated="keep")
    assert all(t for t in g.to_texts(g.random(jax.random.key(0), 0, 3)))
    assert g.usage()["truncated_kept"] == 3 and g.usage()["repairs"] == 0


@pytest.mark.slow
def test_retry_after_is_honoured_and_retries_are_bounded(server, proxies):
    proxy = proxies(server.url, script=["429", "429", "500", "drop", ""], retry_after=0.6)
    g = gen_for(proxy.url, model=server.model, backoff_s=0.02, max_backoff_s=0.1, max_retries=4)
    assert g.to_texts(g.random(jax.random.key(0), 0, 1))[0].strip()
    t = [r["t"] for r in proxy.log]
    assert [r["outcome"].split("+")[0] for r in proxy.log] == ["429", "429", "500", "drop", "ok"]
    # After a 429 the client waits at least Retry-After (0.6 s), else only its jittered backoff (<= 0.1 s).
    assert t[1] - t[0] >= 0.6 and t[2] - t[1] >= 0.6
    assert t[3] - t[2] < 0.45 and t[4] - t[3] < 0.45
    u = g.usage()
    assert (u["rate_limited"], u["server_errors"], u["dropped"], u["retries"]) == (2, 1, 1, 4)
    # A request that keeps failing gives up after max_retries retries, with the last failure named.
    down = proxies(server.url, rates={"500": 1.0})
    g = gen_for(down.url, model=server.model, backoff_s=0.01, max_retries=2)
    with pytest.raises(APIUnavailableError, match=r"failed 3 time\(s\); last: HTTP 500"):
        g.random(jax.random.key(0), 0, 1)
    assert len(down.log) == 3


@pytest.mark.slow
@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_not_retried(server, proxies, status):
    proxy = proxies(server.url, status=status)
    g = gen_for(proxy.url, model=server.model, max_retries=5)
    with pytest.raises(APIRequestRejectedError, match=f"HTTP {status}.*not retried") as e:
        g.random(jax.random.key(0), 0, 1)
    assert len(proxy.log) == 1
    assert isinstance(e.value, GeneratorError)


@pytest.mark.slow
def test_a_rejected_key_stops_the_run_with_its_checkpoint_intact(
    server, proxies, tmp_path, monkeypatch
):
    monkeypatch.setenv("PEJAX_TEST_KEY", SECRET)
    proxy = proxies(server.url, api_key=SECRET)
    common = {
        "model": server.model,
        "temperature": 0.0,
        "on_truncated": "keep",
        "max_concurrency": 4,
    }
    g = gen_for(proxy.url, api_key_env="PEJAX_TEST_KEY", cache_path=tmp_path / "c.sqlite", **common)

    def revoke_after_iteration_0(info):
        if info.iteration == 0:
            proxy.api_key = "another key"

    with pytest.raises(GeneratorError, match="HTTP 401") as e:
        _pe_run(g, tmp_path / "ckpt", callbacks=[revoke_after_iteration_0])
    assert SECRET not in str(e.value) and "[api key]" in str(e.value)
    assert "environment variable PEJAX_TEST_KEY" in str(e.value)
    # Not retried, by the generator or the runner: only the requests already in flight (at most
    # max_concurrency) met the 401, each once; nothing was sent after it.
    rejected = [r["hash"] for r in proxy.log if r["outcome"] == "401"]
    assert 1 <= len(rejected) <= 4 and len(set(rejected)) == len(rejected)
    assert all(r["outcome"] == "401" for r in proxy.log[-len(rejected) :])
    found = ckpt.latest_valid_checkpoint(tmp_path / "ckpt")
    assert found is not None and found[2]["iteration"] == 0
    proxy.api_key = SECRET
    resumed = _pe_run(g, tmp_path / "ckpt", resume=True)
    assert resumed.resumed_from == 0
    unbroken = _pe_run(gen_for(server.url, cache_path=tmp_path / "u.sqlite", **common))
    np.testing.assert_array_equal(np.asarray(resumed.samples), np.asarray(unbroken.samples))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_load_64_requests_in_flight(server, proxies):
    proxy = proxies(server.url)
    g = gen_for(proxy.url, model=server.model, max_concurrency=64, max_tokens=16, temperature=0.0)
    t0 = time.perf_counter()
    texts = g.to_texts(g.random(jax.random.key(5), 0, 160))
    wall = time.perf_counter() - t0
    u = g.usage()
    assert len(texts) == 160 and all(t.strip() for t in texts)
    assert u["failed_attempts"] == 0 and u["requests"] == 160
    assert proxy.max_in_flight >= 64, proxy.max_in_flight
    print(
        f"\nload: 160 requests, {proxy.max_in_flight} in flight at most, {160 / wall:.1f} requests/s, "
        f"{(u['prompt_tokens'] + u['completion_tokens']) / wall:.0f} tokens/s, load average "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )


@pytest.mark.slow
def test_client_side_rate_limits(server, proxies):
    proxy = proxies(server.url)
    g = gen_for(proxy.url, model=server.model, max_concurrency=8, requests_per_minute=300)
    t0 = time.perf_counter()
    g.random(jax.random.key(1), 0, 20)
    # 5 requests a second after a burst of 5: the 20th may start after 3 s at the earliest.
    assert time.perf_counter() - t0 >= 3.0
    starts = sorted(r["t"] for r in proxy.log)
    for i, t in enumerate(starts):
        assert t - starts[0] >= (i - 5) / 5 - 0.05, (i, t - starts[0])
    assert g.usage()["rate_limit_wait_s"] > 0
    tok = proxies(server.url)
    g = gen_for(
        tok.url, model=server.model, max_concurrency=8, tokens_per_minute=6000, max_tokens=16
    )
    t0 = time.perf_counter()
    g.random(jax.random.key(2), 0, 12)
    u = g.usage()
    spent = u["prompt_tokens"] + u["completion_tokens"]
    # 100 tokens a second after a burst of 100 (the last request's tokens are settled after it starts).
    assert time.perf_counter() - t0 >= (spent - 100 - 40) / 100


# ---------------------------------------------------------------------------------------------- pejax run


def _pejax(args, env, timeout=900):
    cmd = [sys.executable, "-c", "import sys; from pejax.cli import main; sys.exit(main())", *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )


def _config(tmp_path, server, url, name):
    config = tomllib.loads(EXAMPLE.read_text())
    config["data"]["path"] = str(ROOT / config["data"]["path"])
    gen = config["generator"]
    gen.update(
        base_url=url,
        model=server.model,
        temperature=0.0,
        on_truncated="keep",
        max_concurrency=4,
        api_key_env="PEJAX_TEST_KEY",
        max_tokens=24,
    )
    config["privacy"]["noise_seed"] = (
        0  # the same noise in both runs, so the killed run can be compared
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))  # YAML is a superset of JSON
    return path


@pytest.mark.slow
def test_pejax_run_killed_mid_iteration_resumes_without_resending(server, proxies, tmp_path):
    pytest.importorskip("sentence_transformers", reason="needs pejax[text]")
    env = dict(
        os.environ,
        PEJAX_TEST_KEY=SECRET,
        PYTHONPATH=str(ROOT / "src"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    outputs = []
    # 1. Killed run: the proxy answers the 16 RANDOM requests and 5 (up to 8) of iteration 1, then holds the rest.
    proxy = proxies(server.url, api_key=SECRET, hold_after=21)
    cfg = _config(tmp_path, server, proxy.url, "killed")
    out = tmp_path / "out"
    proc = _pejax(["run", str(cfg), "--out", str(out), "--no-progress"], env)
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached the hold"
        db = out / "openai_cache.sqlite"
        # Requests already past the hold when the 21st answer went out are answered too: wait until nothing
        # is on its way to the server and the client has stored every answer the proxy delivered.
        if len(proxy.answered) >= 21 and proxy.in_flight == 0 and db.exists():
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                stored = con.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            if stored == len(set(proxy.answered)):
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    outputs += proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.latest_valid_checkpoint(out / "checkpoints")[2]["iteration"] == 0
    answered_before = set(proxy.answered)
    n_before = len(proxy.log)
    proxy.release()
    # 2. Resume: no request that had been answered is sent again.
    proc = _pejax(["run", str(cfg), "--out", str(out), "--resume", "--no-progress"], env)
    outputs += proc.communicate(timeout=900)
    assert proc.returncode == 0, outputs[-1]
    after = [r["hash"] for r in proxy.log[n_before:]]
    assert after and not answered_before & set(after)
    assert max(collections.Counter(proxy.answered).values()) == 1  # no answer paid for twice
    # 3. An unbroken run through a counting proxy releases the same set from the same distinct requests.
    clean = proxies(server.url, api_key=SECRET)
    cfg2 = _config(tmp_path, server, clean.url, "unbroken")
    out2 = tmp_path / "out2"
    proc = _pejax(["run", str(cfg2), "--out", str(out2), "--no-progress"], env)
    outputs += proc.communicate(timeout=900)
    assert proc.returncode == 0, outputs[-1]
    assert (out / "synthetic.jsonl").read_text() == (out2 / "synthetic.jsonl").read_text()
    assert set(proxy.answered) == set(clean.answered)
    report = json.loads((out2 / "report.json").read_text())
    per_it = [it["metrics"]["api_requests"] for it in report["iterations"]]
    assert sum(per_it) == len(clean.log) == report["api_usage"]["requests"]
    assert report["api_usage"]["prompt_tokens"] > 0 and "cost" in report["api_usage"]
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["iterations"][0]["metrics"]["api_requests"] == 16
    # 4. The dry run prints exactly the RANDOM requests the run sent first, and a count that bounds the run.
    proc = _pejax(["run", str(cfg2), "--dry-run"], env)
    stdout, stderr = proc.communicate(timeout=600)
    outputs += [stdout, stderr]
    assert proc.returncode == 0, stderr
    printed = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    assert {body_hash(b) for b in printed} == {r["hash"] for r in clean.log[:16]}
    total = int(stdout.split("total: at most ")[1].split()[0])
    assert len(clean.log) <= total
    # 5. The key appears in no output: files (checkpoints, cache, report), stdout and stderr of every run.
    for path in itertools.chain(out.rglob("*"), out2.rglob("*")):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert all(SECRET not in text for text in outputs)
    assert all(r["auth_ok"] for r in proxy.log + clean.log)  # and it was sent where it belongs
