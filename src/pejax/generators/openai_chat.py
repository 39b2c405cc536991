"""Aug-PE text through any OpenAI-compatible ``/v1/chat/completions`` endpoint (registry kind ``"openai-chat"``).

Private Evolution exists to use models reachable only through their inference APIs. This generator sends Aug-PE's
RANDOM and VARIATION prompts to hosted LLMs or to one's own vLLM, llama.cpp or ``transformers serve`` endpoints:

* RANDOM(y): ``random_template`` filled with ``prompts[y]`` and, for each field of ``random_fills``, a value
  picked by the request seed (the reference implementation's replacement rules: topics, styles, lengths), so
  samples of one class differ even under greedy decoding.
* VARIATION(s, degree): ``ceil(degree * words)`` words of s, picked by the request seed, are replaced by
  ``mask_token`` and the model is asked (``variation_template``) to fill in the blanks and write the whole text.
  Degree 0 returns the samples unchanged without a request. Degree scale: the fraction of words masked, [0, 1].

Samples are uint8 arrays (N, ``max_bytes``) of zero-padded UTF-8 (:mod:`pejax.generators.text_codec`);
``modality = "text"``.

Determinism and resume. Sample i of a call depends only on ``fold_in(key, i)`` (the runner derives ``key`` from the
run's public seed, the iteration and the class), which gives the request's seed and its random choices; the
request body (model, messages, sampling settings, seed) is hashed into a content-addressed SQLite cache
(``cache_path``) where each answer is committed atomically as it arrives. A run killed mid-iteration and resumed
re-sends only the requests that had not been answered and, given the same answers, releases the same set.

Throughput and faults. Requests run concurrently on asyncio (``max_concurrency`` in flight), under client-side
``requests_per_minute`` / ``tokens_per_minute`` limits, spread over one or more endpoints (each with its own key)
to the one with the fewest requests in flight (counted down whether a call succeeds or fails; an endpoint that
answered 429 rests for its Retry-After). Each attempt has a timeout; 429, 5xx, timeouts, dropped connections and
malformed answers are retried with exponential backoff and full jitter, waiting at least the Retry-After the
server gave. 400, 401, 403, 404 and other client errors are not retried: :class:`APIRequestRejectedError` stops
the run (the runner's last checkpoint stays as it was).

Bad completions. An empty, refused (``refusal``, ``finish_reason = "content_filter"``) or non-text completion, or
a truncated one (``finish_reason = "length"``) unless ``on_truncated = "keep"``, is re-requested with another
request seed up to ``max_repairs`` times, then :class:`CompletionError`; an empty string is never kept.

Secrets. API keys come from an environment variable (``api_key_env``) or a file (``api_key_file``), never from
arguments or configs; they are sent in the ``Authorization`` header only, are not part of cache keys, names,
reprs or usage records, and are replaced by ``[api key]`` in any server text quoted in an error.

Usage. :meth:`OpenAIChatGenerator.usage` (totals) and :meth:`OpenAIChatGenerator.pop_usage` (since the last pop;
the driver pops once per iteration) count requests, answers, cache hits, retries, failures by kind, repairs,
prompt and completion tokens and their cost. :func:`dry_run` prints the requests a config would send.

HTTP client: ``httpx2`` (the maintained successor of httpx that the official ``openai`` SDK itself is built on),
used directly: pejax needs its own retry, balancing, rate-limit and cache logic around each attempt, which the
SDK's built-in retries would hide (see BUILD_NOTES.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import email.utils
import hashlib
import json
import math
import numbers
import os
import pathlib
import random
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pejax import _torch_bridge as tb
from pejax import _validate
from pejax.errors import APIRequestRejectedError as APIRequestRejectedError
from pejax.errors import APIUnavailableError as APIUnavailableError
from pejax.errors import CompletionError as CompletionError
from pejax.generators._rate_limit import RateLimiter
from pejax.generators._response_cache import ResponseCache
from pejax.generators._response_cache import request_key
from pejax.generators.text_codec import check_mask_token
from pejax.generators.text_codec import decode_texts
from pejax.generators.text_codec import encode_texts

_EXTRA = "api"

DEFAULT_RANDOM_TEMPLATE = "{prompt}"
"""User message of RANDOM: fields ``prompt`` (the class prompt) and one per key of ``random_fills``."""

DEFAULT_VARIATION_TEMPLATE = (
    "{prompt}\nFill in the blanks ({mask}) in the text below and write the whole text again, in about "
    "{words} words. Answer with the text only.\nText: {masked}"
)
"""User message of VARIATION: fields ``prompt``, ``mask``, ``words`` (words of the original), ``masked``."""

ON_TRUNCATED = ("retry", "keep")
"""Accepted values of ``on_truncated``."""

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
"""HTTP statuses retried with backoff (with every other 5xx); other 4xx stop the run."""

USAGE_COUNTERS = (
    "requests",
    "answers",
    "cache_hits",
    "retries",
    "failed_attempts",
    "rate_limited",
    "server_errors",
    "timeouts",
    "dropped",
    "malformed",
    "repairs",
    "empty",
    "refused",
    "non_text",
    "truncated",
    "truncated_kept",
    "prompt_tokens",
    "completion_tokens",
)
"""Keys of :meth:`OpenAIChatGenerator.usage` besides ``cost`` and ``rate_limit_wait_s``."""

_SEED_MOD = 2**31 - 1  # request seeds fit a signed 32-bit int, which every server accepts


# ------------------------------------------------------------------------------------------- validation


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _num(name: str, value: Any, lo: float, hi: float = math.inf, *, open_lo: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    v = float(value)
    if v < lo or v > hi or (open_lo and v == lo):
        raise ValueError(f"{name} must lie in {'(' if open_lo else '['}{lo}, {hi}], got {value!r}.")
    return v


def _check_template(name: str, template: Any, required: tuple[str, ...], fields: dict) -> str:
    if not isinstance(template, str):
        raise ValueError(f"{name} must be a string, got {template!r}.")
    for f in required:
        if "{" + f + "}" not in template:
            raise ValueError(f"{name} must contain the field {{{f}}}, got {template!r}.")
    try:
        template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"{name} may only use the fields {sorted(fields)} (write a literal brace as {{{{ or }}}}): {e!r}."
        ) from e
    return template


def _check_fills(fills: Any) -> dict[str, tuple[str, ...]]:
    if fills is None:
        return {}
    if not isinstance(fills, Mapping):
        raise TypeError(
            f"random_fills must be a mapping field -> list of strings, got {type(fills).__name__}."
        )
    out = {}
    for k, v in fills.items():
        if not isinstance(k, str) or not k.isidentifier() or k == "prompt":
            raise ValueError(
                f"random_fills keys must be template field names other than 'prompt', got {k!r}."
            )
        if isinstance(v, str) or not isinstance(v, Sequence) or not v:
            raise ValueError(f"random_fills[{k!r}] must be a non-empty list of strings, got {v!r}.")
        for i, s in enumerate(v):
            if not isinstance(s, str):
                raise ValueError(f"random_fills[{k!r}][{i}] must be a string, got {s!r}.")
        out[k] = tuple(v)
    return out


def _load_key(api_key_env: Any, api_key_file: Any, where: str) -> tuple[str | None, str]:
    """(key, description of its source); the description never holds the key."""
    if api_key_env is not None and api_key_file is not None:
        raise ValueError(f"{where}: give api_key_env or api_key_file, not both.")
    if api_key_env is not None:
        if not isinstance(api_key_env, str) or not api_key_env:
            raise ValueError(
                f"{where}: api_key_env must name an environment variable, got {api_key_env!r}."
            )
        key = os.environ.get(api_key_env)
        if not key or not key.strip():
            raise ValueError(
                f"{where}: the environment variable {api_key_env} named by api_key_env is not set or "
                "empty; export the API key in it (it is never read from the config itself)."
            )
        return key.strip(), f"environment variable {api_key_env}"
    if api_key_file is not None:
        if not isinstance(api_key_file, str | os.PathLike):
            raise ValueError(f"{where}: api_key_file must be a file path, got {api_key_file!r}.")
        p = pathlib.Path(api_key_file).expanduser()
        if not p.is_file():
            raise ValueError(
                f"{where}: api_key_file {str(p)!r} does not exist or is not a file; write the API key "
                "into it (one line)."
            )
        key = p.read_text(encoding="utf-8").strip()
        if not key:
            raise ValueError(f"{where}: api_key_file {str(p)!r} is empty.")
        return key, f"file {str(p)!r}"
    return None, "no API key (none configured)"


class _Endpoint:
    """One base URL with its key; counts requests in flight for least-loaded balancing."""

    def __init__(self, base_url: Any, api_key_env: Any, api_key_file: Any, where: str):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"{where}: base_url must be an http(s) URL such as 'http://127.0.0.1:8000/v1', got "
                f"{base_url!r}."
            )
        self.base_url = base_url.rstrip("/")
        self._key, self.key_source = _load_key(api_key_env, api_key_file, where)
        self.in_flight = 0
        self.sent = 0
        self.failed = 0
        self.resting_until = 0.0

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self._key is not None:
            h["Authorization"] = f"Bearer {self._key}"
        return h

    def __repr__(self) -> str:
        return f"_Endpoint({self.base_url!r}, key from {self.key_source})"


def _attempt_seed(base: int, attempt: int) -> int:
    if attempt == 0:
        return int(base % _SEED_MOD)
    digest = hashlib.sha256(f"{base}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % _SEED_MOD


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or ``None``."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _run_coro(coro):
    """Runs a coroutine to completion, also from code that already runs an event loop (notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a task group: a permanent one first, never a cancellation."""
    flat: list[BaseException] = []

    def walk(e):
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        elif not isinstance(e, asyncio.CancelledError):
            flat.append(e)

    walk(group)
    for kind in (APIRequestRejectedError, CompletionError):
        for e in flat:
            if isinstance(e, kind):
                return e
    return flat[0] if flat else group


@dataclasses.dataclass
class _Job:
    """One sample: its request without a seed, its base seed, and where it came from (for messages)."""

    body: dict[str, Any]
    seed: int
    what: str


class OpenAIChatGenerator:
    """Aug-PE RANDOM and VARIATION through OpenAI-compatible chat-completions endpoints.

    See the module docstring for the prompts, the degree scale, determinism, faults and secrets.

    Args:
      model: the model name sent in each request.
      prompts: one prompt per class, a list (``prompts[y]``) or a mapping {0: ..., C-1: ...}.
      base_url: the API root of one endpoint, e.g. ``"http://127.0.0.1:8000/v1"`` (requests go to
        ``base_url + "/chat/completions"``). Give this or ``endpoints``.
      api_key_env / api_key_file: where the key of ``base_url`` is read (an environment variable's name, or a
        file); neither: no ``Authorization`` header (local servers).
      endpoints: several endpoints instead of ``base_url``: a list of mappings with ``base_url`` and
        optionally ``api_key_env`` or ``api_key_file`` (replicas serving the same model).
      system_prompt: an optional system message put before every user message.
      random_template: RANDOM's user message, fields ``{prompt}`` and the keys of ``random_fills``.
      random_fills: field -> list of values; each RANDOM request picks one value per field with its seed.
      variation_template: VARIATION's user message, fields ``{masked}`` (required), ``{prompt}``, ``{mask}``,
        ``{words}``.
      mask_token: the blank written in place of a masked word (no spaces).
      max_tokens: completion tokens a request may use.
      length_factor / length_slack: adaptive VARIATION length (Aug-PE): ``min(max_tokens, ceil(length_factor *
        bytes of the original / 4) + length_slack)`` tokens; ``length_factor=None``: always ``max_tokens``.
      max_tokens_field: the body field carrying the limit: ``"max_tokens"`` or ``"max_completion_tokens"``.
      temperature: sampling temperature in [0, 2] (0: greedy on most servers).
      top_p: nucleus mass in (0, 1], or ``None`` to leave the server's default.
      send_seed: send each request's seed (``seed`` field); the cache key holds it either way.
      extra_body: extra JSON fields merged into every request (server-specific sampling options).
      max_bytes: L, the byte length of a sample row.
      max_concurrency: requests in flight at once, over all endpoints.
      requests_per_minute / tokens_per_minute: client-side limits (``None``: none).
      timeout_s: per-attempt timeout in seconds.
      max_retries: retries of one request after a retryable failure.
      backoff_s / max_backoff_s: backoff base and cap: attempt a waits uniform(0, min(cap, base * 2**a)) s, and
        at least the server's Retry-After.
      max_repairs: re-requests (with other seeds) of an empty, refused, non-text or truncated completion.
      on_truncated: ``"retry"`` (repair a ``finish_reason = "length"`` completion) or ``"keep"`` (keep the text
        cut at the token limit, as Aug-PE does).
      cache_path: SQLite response cache file (``None``: answers are kept in memory for this object only).
      prompt_price / completion_price: price per million prompt / completion tokens, for ``usage()["cost"]``.
      progress: show a tqdm bar over the requests of each call, with tokens, retries and failures.
      trust_env: let the HTTP client read proxy settings from the environment.
      name: reported name; by default ``"openai-chat:<model>:<hash of the request settings>"``, so a resume with
        other prompts or sampling settings is refused by the runner.
    """

    modality = "text"

    def __init__(
        self,
        *,
        model: str,
        prompts: Sequence[str] | Mapping[int, str],
        base_url: str | None = None,
        api_key_env: str | None = None,
        api_key_file: str | os.PathLike | None = None,
        endpoints: Sequence[Mapping[str, Any]] | None = None,
        system_prompt: str | None = None,
        random_template: str = DEFAULT_RANDOM_TEMPLATE,
        random_fills: Mapping[str, Sequence[str]] | None = None,
        variation_template: str = DEFAULT_VARIATION_TEMPLATE,
        mask_token: str = "_",
        max_tokens: int = 128,
        length_factor: float | None = None,
        length_slack: int = 8,
        max_tokens_field: str = "max_tokens",
        temperature: float = 1.0,
        top_p: float | None = None,
        send_seed: bool = True,
        extra_body: Mapping[str, Any] | None = None,
        max_bytes: int = 512,
        max_concurrency: int = 16,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 8,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        max_repairs: int = 3,
        on_truncated: str = "retry",
        cache_path: str | os.PathLike | None = None,
        prompt_price: float = 0.0,
        completion_price: float = 0.0,
        progress: bool = False,
        trust_env: bool = True,
        name: str | None = None,
    ):
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty model name, got {model!r}.")
        self.model = model
        self.prompts = tb.check_prompts(prompts)
        if endpoints is not None and (
            base_url is not None or api_key_env is not None or api_key_file is not None
        ):
            raise ValueError(
                "give either base_url (with api_key_env or api_key_file) or endpoints (a list, each with its "
                "own base_url and key), not both."
            )
        if endpoints is None:
            if base_url is None:
                raise ValueError(
                    "base_url is required (e.g. 'http://127.0.0.1:8000/v1'), or endpoints for several."
                )
            self._endpoints = [_Endpoint(base_url, api_key_env, api_key_file, "base_url")]
        else:
            if (
                isinstance(endpoints, str | Mapping)
                or not isinstance(endpoints, Sequence)
                or not endpoints
            ):
                raise ValueError(
                    "endpoints must be a non-empty list of mappings with base_url and optionally "
                    "api_key_env or api_key_file."
                )
            self._endpoints = []
            for i, ep in enumerate(endpoints):
                if not isinstance(ep, Mapping):
                    raise ValueError(f"endpoints[{i}] must be a mapping with base_url, got {ep!r}.")
                unknown = sorted(set(ep) - {"base_url", "api_key_env", "api_key_file"})
                if unknown:
                    raise ValueError(
                        f"endpoints[{i}] has unknown key(s) {unknown}; valid: base_url, api_key_env, "
                        "api_key_file (an API key itself is never accepted in a config)."
                    )
                self._endpoints.append(
                    _Endpoint(
                        ep.get("base_url"),
                        ep.get("api_key_env"),
                        ep.get("api_key_file"),
                        f"endpoints[{i}]",
                    )
                )
        if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt):
            raise ValueError(
                f"system_prompt must be a non-empty string or None, got {system_prompt!r}."
            )
        self.system_prompt = system_prompt
        self.random_fills = _check_fills(random_fills)
        self.random_template = _check_template(
            "random_template",
            random_template,
            ("prompt",),
            {"prompt": "", **dict.fromkeys(self.random_fills, "")},
        )
        self.variation_template = _check_template(
            "variation_template",
            variation_template,
            ("masked",),
            {"prompt": "", "mask": "", "words": 0, "masked": ""},
        )
        self.mask_token = check_mask_token(mask_token)
        self.max_tokens = _int("max_tokens", max_tokens, 1)
        self.length_factor = (
            None
            if length_factor is None
            else _num("length_factor", length_factor, 0.0, 100.0, open_lo=True)
        )
        self.length_slack = _int("length_slack", length_slack, 0)
        if max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ValueError(
                "max_tokens_field must be 'max_tokens' or 'max_completion_tokens', got "
                f"{max_tokens_field!r}."
            )
        self.max_tokens_field = max_tokens_field
        self.temperature = _num("temperature", temperature, 0.0, 2.0)
        self.top_p = None if top_p is None else _num("top_p", top_p, 0.0, 1.0, open_lo=True)
        self.send_seed = bool(send_seed)
        if extra_body is not None and not isinstance(extra_body, Mapping):
            raise ValueError(f"extra_body must be a mapping of JSON fields, got {extra_body!r}.")
        reserved = {"model", "messages", "seed", "stream", self.max_tokens_field}
        clash = sorted(reserved & set(extra_body or {}))
        if clash:
            raise ValueError(
                f"extra_body must not set {clash}: the generator sets those fields itself."
            )
        try:
            json.dumps(dict(extra_body or {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"extra_body must be JSON-serialisable: {e}.") from e
        self.extra_body = dict(extra_body or {})
        self.max_bytes = _int("max_bytes", max_bytes, 4)
        self.max_concurrency = _int("max_concurrency", max_concurrency, 1)
        self._limiter = RateLimiter(requests_per_minute, tokens_per_minute)
        self.requests_per_minute, self.tokens_per_minute = requests_per_minute, tokens_per_minute
        self.timeout_s = _num("timeout_s", timeout_s, 0.0, open_lo=True)
        self.max_retries = _int("max_retries", max_retries, 0)
        self.backoff_s = _num("backoff_s", backoff_s, 0.0)
        self.max_backoff_s = _num("max_backoff_s", max_backoff_s, 0.0)
        self.max_repairs = _int("max_repairs", max_repairs, 0)
        if on_truncated not in ON_TRUNCATED:
            raise ValueError(f"on_truncated must be one of {ON_TRUNCATED}, got {on_truncated!r}.")
        self.on_truncated = on_truncated
        self.prompt_price = _num("prompt_price", prompt_price, 0.0)
        self.completion_price = _num("completion_price", completion_price, 0.0)
        self.progress = bool(progress)
        self.trust_env = bool(trust_env)
        self._cache = None if cache_path is None else ResponseCache(cache_path)
        self._memory: dict[str, dict] = {}
        self._totals = dict.fromkeys(USAGE_COUNTERS, 0)
        self._since = dict.fromkeys(USAGE_COUNTERS, 0)
        self._waited_popped = 0.0
        settings = {
            "model": model,
            "prompts": self.prompts,
            "system_prompt": system_prompt,
            "random_template": self.random_template,
            "random_fills": self.random_fills,
            "variation_template": self.variation_template,
            "mask_token": mask_token,
            "max_tokens": self.max_tokens,
            "length": [self.length_factor, self.length_slack],
            "temperature": self.temperature,
            "top_p": self.top_p,
            "extra_body": self.extra_body,
            "max_bytes": self.max_bytes,
            "on_truncated": on_truncated,
        }
        digest = request_key(json.loads(json.dumps(settings, default=list)))[:12]
        self.name = name or f"openai-chat:{model}:{digest}"
        # Imported here so that a missing extra is a clear error when the generator is built.
        self._httpx = tb.require("httpx2", _EXTRA)

    # -------------------------------------------------------------------------------- public helpers

    @property
    def endpoints(self) -> list[dict[str, Any]]:
        """Base URL, key source (never the key), requests sent and failed, and requests in flight."""
        return [
            {
                "base_url": e.base_url,
                "key_source": e.key_source,
                "sent": e.sent,
                "failed": e.failed,
                "in_flight": e.in_flight,
            }
            for e in self._endpoints
        ]

    def usage(self) -> dict[str, float]:
        """Totals since construction: every counter of :data:`USAGE_COUNTERS`, ``cost`` and the seconds
        requests waited for the client-side rate limits (``rate_limit_wait_s``)."""
        return self._with_cost(self._totals, self._limiter.waited_s)

    def pop_usage(self) -> dict[str, float]:
        """Like :meth:`usage` but counted since the previous ``pop_usage`` (the driver pops per iteration)."""
        out = self._with_cost(self._since, self._limiter.waited_s - self._waited_popped)
        self._since = dict.fromkeys(USAGE_COUNTERS, 0)
        self._waited_popped = self._limiter.waited_s
        return out

    def _with_cost(self, counts: dict, waited: float) -> dict[str, float]:
        out: dict[str, float] = dict(counts)
        out["cost"] = (
            counts["prompt_tokens"] * self.prompt_price
            + counts["completion_tokens"] * self.completion_price
        ) / 1e6
        out["rate_limit_wait_s"] = float(waited)
        return out

    def _count(self, name: str, n: int = 1) -> None:
        self._totals[name] += n
        self._since[name] += n

    def random_requests(self, key: jax.Array, label: int, num_samples: int) -> list[dict[str, Any]]:
        """The request bodies :meth:`random` would send first (one per sample; repairs not included)."""
        jobs = self._random_jobs(
            _validate.check_key(key), label, _int("num_samples", num_samples, 0)
        )
        return [self._body(j, 0)[0] for j in jobs]

    def to_texts(self, samples: Any) -> list[str]:
        """Decodes samples (uint8 (N, L) UTF-8 bytes) to N strings."""
        return decode_texts(samples)

    def close(self) -> None:
        """Closes the response cache file."""
        if self._cache is not None:
            self._cache.close()

    # -------------------------------------------------------------------------------- requests

    def _messages(self, user: str) -> list[dict[str, str]]:
        msgs = (
            []
            if self.system_prompt is None
            else [{"role": "system", "content": self.system_prompt}]
        )
        return [*msgs, {"role": "user", "content": user}]

    def _base_body(self, user: str, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            **self.extra_body,
            "model": self.model,
            "messages": self._messages(user),
            self.max_tokens_field: int(max_tokens),
            "temperature": self.temperature,
        }
        if self.top_p is not None:
            body["top_p"] = self.top_p
        return body

    def _body(self, job: _Job, attempt: int) -> tuple[dict[str, Any], str]:
        """(body to send, cache key) of a job's ``attempt``-th request (0: first, > 0: repairs)."""
        seed = _attempt_seed(job.seed, attempt)
        keyed = {**job.body, "seed": seed}
        return (keyed if self.send_seed else job.body), request_key(keyed)

    def _random_jobs(self, key, label, n) -> list[_Job]:
        prompt = tb.prompt_for(self.prompts, label)
        jobs = []
        for i, seed in enumerate(tb.sample_seeds(key, n)):
            rng = random.Random(seed)
            fills = {f: rng.choice(values) for f, values in sorted(self.random_fills.items())}
            user = self.random_template.format(prompt=prompt, **fills)
            jobs.append(
                _Job(self._base_body(user, self.max_tokens), seed, f"random class {label} #{i}")
            )
        return jobs

    def _variation_jobs(self, key, texts: list[str], label, degree) -> list[_Job]:
        prompt = tb.prompt_for(self.prompts, label)
        jobs = []
        for i, (text, seed) in enumerate(zip(texts, tb.sample_seeds(key, len(texts)), strict=True)):
            words = text.split()
            m = min(len(words), math.ceil(degree * len(words)))
            rng = np.random.default_rng(seed)
            for pos in rng.choice(len(words), size=m, replace=False).tolist():
                words[pos] = self.mask_token
            user = self.variation_template.format(
                prompt=prompt, mask=self.mask_token, words=len(words), masked=" ".join(words)
            )
            budget = self.max_tokens
            if self.length_factor is not None:
                est = math.ceil(self.length_factor * len(text.encode("utf-8")) / 4)
                budget = max(1, min(self.max_tokens, est + self.length_slack))
            jobs.append(_Job(self._base_body(user, budget), seed, f"variation class {label} #{i}"))
        return jobs

    # -------------------------------------------------------------------------------- protocol

    def random(self, key: jax.Array, label: int, num_samples: int) -> jax.Array:
        """Asks for ``num_samples`` texts of class ``label`` (RANDOM_API).

        Args:
          key: ``jax.random`` key; text i depends only on ``fold_in(key, i)`` (and the server's answer).
          label: class index in [0, len(prompts)).
          num_samples: N >= 0.

        Returns:
          uint8 (N, max_bytes) UTF-8 bytes.

        Raises:
          APIRequestRejectedError: the endpoint refused a request (400, 401, 403, 404, ...).
          APIUnavailableError: a request failed after every retry.
          CompletionError: a request got no usable text after every repair.
        """
        n = _int("num_samples", num_samples, 0)
        if isinstance(key, jax.core.Tracer):
            # Shape-only evaluation (jax.eval_shape, e.g. the runner restoring a checkpoint): send nothing.
            return jnp.zeros((n, self.max_bytes), jnp.uint8)
        key = _validate.check_key(key)
        jobs = self._random_jobs(key, label, n)
        return self._encode(self._run(jobs, f"random class {label}"))

    def variation(self, key: jax.Array, samples: Any, label: int, degree: float) -> jax.Array:
        """Masks a fraction ``degree`` of each text's words and asks for the whole text (VARIATION_API).

        Args:
          key: ``jax.random`` key; text i depends only on ``fold_in(key, i)``, sample i and the answer.
          samples: uint8 (N, max_bytes) UTF-8 bytes made by this generator.
          label: class index in [0, len(prompts)).
          degree: fraction of words masked, in [0, 1]; 0 returns the samples unchanged (no request).

        Returns:
          uint8 (N, max_bytes) UTF-8 bytes.

        Raises:
          the errors of :meth:`random`.
        """
        arr = np.asarray(samples) if not isinstance(samples, jax.core.Tracer) else samples
        if arr.ndim != 2 or arr.dtype != np.uint8 or arr.shape[1] != self.max_bytes:
            raise ValueError(
                f"samples must be a uint8 array (N, {self.max_bytes}) of UTF-8 bytes as this generator makes "
                f"them (max_bytes={self.max_bytes}), got {arr.dtype} {arr.shape}."
            )
        d = _num("degree", degree, 0.0, 1.0)
        if isinstance(key, jax.core.Tracer) or isinstance(samples, jax.core.Tracer):
            return jnp.zeros(arr.shape, jnp.uint8)
        key = _validate.check_key(key)
        tb.prompt_for(self.prompts, label)
        if d == 0.0 or arr.shape[0] == 0:
            return jnp.asarray(arr)
        jobs = self._variation_jobs(key, decode_texts(arr), label, d)
        return self._encode(self._run(jobs, f"variation class {label}"))

    def _encode(self, texts: list[str]) -> jax.Array:
        return jnp.asarray(encode_texts(texts, self.max_bytes))

    # -------------------------------------------------------------------------------- engine

    def _run(self, jobs: list[_Job], desc: str) -> list[str]:
        if not jobs:
            return []
        bar = tb.progress_bar(len(jobs), f"{self.name.split(':')[0]} {desc}", self.progress)

        async def main():
            self._limiter.reset_loop()
            httpx = self._httpx
            limits = httpx.Limits(
                max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
            )
            timeout = httpx.Timeout(self.timeout_s, pool=None)
            async with httpx.AsyncClient(
                limits=limits, timeout=timeout, trust_env=self.trust_env
            ) as client:
                sem = asyncio.Semaphore(self.max_concurrency)
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(self._sample(client, sem, job, bar)) for job in jobs]
                return [t.result() for t in tasks]

        try:
            return _run_coro(main())
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        finally:
            bar.close()

    async def _sample(self, client, sem, job: _Job, bar) -> str:
        problems = []
        for attempt in range(self.max_repairs + 1):
            body, key = self._body(job, attempt)
            answer = self._cached(key)
            if answer is None:
                answer = await self._post(client, sem, body, job.what)
                self._store(key, answer)
            else:
                self._count("cache_hits")
            text, problem = self._judge(answer)
            if problem is None:
                bar.update(1)
                self._postfix(bar)
                return text
            problems.append(problem)
            self._count(problem)
            if attempt < self.max_repairs:
                self._count("repairs")
        raise CompletionError(
            f"{self.name}: {job.what} got no usable text in {self.max_repairs + 1} answer(s) (each with "
            f"another request seed): {', '.join(problems)}. Check the model and prompts, raise max_tokens "
            "or max_repairs, or set on_truncated='keep' to accept texts cut at the token limit."
        )

    def _postfix(self, bar) -> None:
        if hasattr(bar, "set_postfix"):
            t = self._totals
            bar.set_postfix(
                req=t["requests"],
                tok=t["prompt_tokens"] + t["completion_tokens"],
                retry=t["retries"],
                fail=t["failed_attempts"],
                refresh=False,
            )

    def _cached(self, key: str) -> dict | None:
        if self._cache is not None:
            return self._cache.get(key)
        return self._memory.get(key)

    def _store(self, key: str, answer: dict) -> None:
        if self._cache is not None:
            self._cache.put(key, answer)
        else:
            self._memory[key] = answer

    def _judge(self, answer: dict) -> tuple[str, str | None]:
        """(text, problem): problem is None for a usable completion, else its kind (a usage counter)."""
        content = answer.get("content")
        finish = answer.get("finish_reason")
        if answer.get("refusal") or finish == "content_filter":
            return "", "refused"
        if not isinstance(content, str):
            return "", "non_text"
        text = content.replace("\x00", "").strip()
        if not text:
            return "", "empty"
        if finish == "length":
            if self.on_truncated == "retry":
                return "", "truncated"
            self._count("truncated_kept")
        return text, None

    @staticmethod
    def _parse(data: Any) -> dict[str, Any] | None:
        """The parts of a chat-completions answer pejax keeps, or ``None`` when it is not one."""
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            return None
        if not data["choices"] or not isinstance(data["choices"][0], dict):
            return None
        choice = data["choices"][0]
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text parts only
            parts = [
                p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"
            ]
            content = "".join(p for p in parts if isinstance(p, str)) if parts else None
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}

        def tokens(name):
            v = usage.get(name)
            return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0

        return {
            "content": content if isinstance(content, str) else None,
            "finish_reason": choice.get("finish_reason"),
            "refusal": message.get("refusal") or None,
            "prompt_tokens": tokens("prompt_tokens"),
            "completion_tokens": tokens("completion_tokens"),
        }

    def _redact(self, text: str) -> str:
        for e in self._endpoints:
            if e._key:
                text = text.replace(e._key, "[api key]")
        return text

    async def _pick(self) -> _Endpoint:
        while True:
            now = time.monotonic()
            ready = [e for e in self._endpoints if e.resting_until <= now]
            if ready:
                return min(ready, key=lambda e: (e.in_flight, e.sent))
            await asyncio.sleep(min(e.resting_until for e in self._endpoints) - now)

    def _estimate(self, body: dict) -> int:
        chars = sum(len(m["content"]) for m in body["messages"])
        return math.ceil(chars / 4) + int(body[self.max_tokens_field])

    async def _post(self, client, sem, body: dict, what: str) -> dict:
        httpx = self._httpx
        jitter = random.Random(request_key(body))
        for attempt in range(self.max_retries + 1):
            ep = await self._pick()
            estimate = self._estimate(body)
            status, kind, detail, retry_after, answer = None, None, "", None, None
            async with sem:
                await self._limiter.acquire(estimate)
                ep.in_flight += 1
                ep.sent += 1
                self._count("requests")
                try:
                    # timeout_s bounds the whole attempt (connect, send, wait, read), not each phase.
                    async with asyncio.timeout(self.timeout_s):
                        resp = await client.post(
                            ep.base_url + "/chat/completions", json=body, headers=ep.headers()
                        )
                    status = resp.status_code
                    if status == 200:
                        try:
                            answer = self._parse(resp.json())
                        except ValueError:
                            answer = None
                        if answer is None:
                            kind, detail = (
                                "malformed",
                                "HTTP 200 without a chat completion in its body",
                            )
                    else:
                        detail = f"HTTP {status}: {self._redact(resp.text[:300])}"
                        retry_after = _retry_after(resp.headers.get("retry-after"))
                except (httpx.TimeoutException, TimeoutError) as e:
                    kind, detail = (
                        "timeouts",
                        f"no answer within timeout_s={self.timeout_s:g} ({type(e).__name__})",
                    )
                except httpx.TransportError as e:
                    kind, detail = "dropped", f"connection failed or dropped ({type(e).__name__})"
                finally:
                    ep.in_flight -= 1
            if answer is not None:
                self._count("answers")
                self._count("prompt_tokens", answer["prompt_tokens"])
                self._count("completion_tokens", answer["completion_tokens"])
                self._limiter.settle(
                    estimate, answer["prompt_tokens"] + answer["completion_tokens"] or estimate
                )
                return answer
            if status is not None and status != 200:
                if status == 429:
                    kind = "rate_limited"
                elif status >= 500 or status in RETRYABLE_STATUS:
                    kind = "server_errors"
                else:
                    ep.failed += 1
                    self._count("failed_attempts")
                    raise APIRequestRejectedError(
                        f"{self.name}: endpoint {ep.base_url} refused {what} with {detail}. Client errors are "
                        f"not retried; {_hint(status, ep)} The run stopped; its last checkpoint is intact."
                    )
            ep.failed += 1
            self._count("failed_attempts")
            self._count(kind)
            if attempt == self.max_retries:
                break
            self._count("retries")
            wait = jitter.uniform(0.0, min(self.max_backoff_s, self.backoff_s * 2.0**attempt))
            if retry_after is not None:
                wait = max(wait, retry_after)
                if status == 429:
                    ep.resting_until = max(ep.resting_until, time.monotonic() + retry_after)
            await asyncio.sleep(wait)
        raise APIUnavailableError(
            f"{self.name}: {what} failed {self.max_retries + 1} time(s); last: {detail} (endpoint "
            f"{ep.base_url}). Raise max_retries or timeout_s, or check the server."
        )

    def __repr__(self) -> str:
        return f"OpenAIChatGenerator(name={self.name!r}, endpoints={self._endpoints!r})"


def _hint(status: int, ep: _Endpoint) -> str:
    if status == 401:
        return f"check the API key (read from {ep.key_source})."
    if status == 403:
        return f"the API key (read from {ep.key_source}) has no access to this model or endpoint."
    if status == 404:
        return "check base_url (it usually ends in /v1) and the model name."
    return "the server refused the request body: check model, sampling settings and extra_body."


# ------------------------------------------------------------------------------------------- config face


def from_options(opts: Mapping[str, Any], ctx: Any) -> OpenAIChatGenerator:
    """Builds the generator from the checked options of a ``[generator] kind = "openai-chat"`` table.

    Called by the generator registry (:mod:`pejax.registry`), which has refused unknown keys (an ``api_key``
    among them: keys come from ``api_key_env`` or ``api_key_file``) and filled in the defaults.

    Args:
      opts: every option of the kind (see ``pejax components``); ``cache`` is the response cache file.
      ctx: the :class:`pejax.registry.BuildContext`: its class names fill ``prompt_template`` when ``prompts``
        is unset, and its ``out`` folder holds the default cache ``out/openai_cache.sqlite`` (no ``out`` and no
        ``cache``: answers are kept in memory only, and a resumed run sends its requests again).

    Returns:
      the generator.
    """
    from pejax.registry import class_prompts

    kw = dict(opts)
    prompts = class_prompts(kw, ctx, "generator")
    for k in ("prompts", "prompt_template"):
        kw.pop(k)
    cache = kw.pop("cache")
    if cache is None and getattr(ctx, "out", None) is not None:
        cache = pathlib.Path(ctx.out) / "openai_cache.sqlite"
    if kw["variation_template"] is None:
        kw["variation_template"] = DEFAULT_VARIATION_TEMPLATE
    if kw["endpoints"] is not None and isinstance(kw["endpoints"], list | tuple):
        kw["endpoints"] = [dict(e) if isinstance(e, Mapping) else e for e in kw["endpoints"]]
    return OpenAIChatGenerator(prompts=prompts, cache_path=cache, **kw)


def request_counts(pe, sizes: Sequence[int]) -> dict[int, tuple[int, bool]]:
    """Requests a run sends per iteration (before repairs and retries), from the PE config alone.

    Args:
      pe: a :class:`pejax.config.PEConfig`.
      sizes: candidates per class.

    Returns:
      {iteration: (requests, exact)}; ``exact`` is False where the count is an upper bound (the last iteration
      with ``output = "parents"`` varies only repeated parents, which depend on the votes).
    """
    n = int(sum(sizes))
    f = pe.final_samples_per_class
    n_final = n if f is None else f * len(sizes)
    counts = {0: (n, True)}
    for t in range(1, pe.iterations + 1):
        deg = pe.degree(t)
        c = pe.lookahead_degree * n if deg > 0 else 0
        if t < pe.iterations:
            c += n if deg > 0 else 0
            counts[t] = (c, True)
        elif pe.output == "parents":
            counts[t] = (c + (n_final if pe.final_degree > 0 else 0), pe.final_degree == 0)
        else:
            counts[t] = (c + (n_final if pe.final_degree > 0 else 0), True)
    return counts


def dry_run(config: Mapping[str, Any], echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Prints the requests a ``pejax run`` config would send, and their number, without sending any.

    The RANDOM requests of iteration 0 depend only on public inputs (the seed, the class sizes, the config)
    and are printed in full, one JSON body a line. VARIATION requests rewrite the parents that the private
    votes select, so only their number is known before the run. With DP class counts (no
    ``privacy.class_proportions``) the class sizes are drawn at run time; the dry run then shows an even
    split (the total is exact). API keys are read (to check they exist) but never printed.

    Args:
      config: a config dict as ``pejax run`` reads it.
      echo: where lines go.

    Returns:
      ``{"random_requests": [...bodies], "counts": {iteration: requests}, "exact": bool, "total": int}``.
    """
    from pejax import config as cfg
    from pejax import registry
    from pejax.run_config import load_dataset
    from pejax.runner import allocate

    pe = cfg.pe_from_dict(config.get("pe"))
    proportions = (config.get("privacy") or {}).get("class_proportions")
    seed = (config.get("run") or {}).get("seed", 0)
    data = load_dataset(config.get("data"))  # for the class names that fill prompt_template
    names = data.class_names or tuple(str(i) for i in range(pe.num_classes))
    ctx = registry.BuildContext(
        pe.num_classes, tuple(names), tuple(data.samples.shape), data.modality
    )
    gen = registry.build("generator", config.get("generator"), ctx, "[generator]")
    if not isinstance(gen, OpenAIChatGenerator):
        raise ValueError(
            "--dry-run prints the requests of an API generator; this config's [generator] kind is not "
            "'openai-chat'."
        )
    if proportions is not None:
        props, note = [float(p) for p in proportions], "public class proportions"
    else:
        props = [1.0 / pe.num_classes] * pe.num_classes
        note = "an even split (the run draws class sizes from DP class counts)"
    sizes = allocate(pe.samples_per_iteration, props, pe.min_samples_per_class)
    key = jax.random.key(seed)
    bodies = []
    echo(
        f"# dry run of {gen.name}: RANDOM requests of iteration 0 for class sizes {list(sizes)} ({note})"
    )
    for y, n in enumerate(sizes):
        # The runner's key for class y's initial population: fold_in(fold_in(key, 0), y).
        k_y = jax.random.fold_in(jax.random.fold_in(key, 0), y)
        for body in gen.random_requests(k_y, y, n):
            bodies.append(body)
            echo(json.dumps(body, ensure_ascii=False, sort_keys=True))
    counts = request_counts(pe, sizes)
    total = sum(c for c, _ in counts.values())
    exact = all(e for _, e in counts.values())
    for t, (c, e) in counts.items():
        what = "RANDOM" if t == 0 else "VARIATION"
        echo(f"# iteration {t}: {c} {what} request(s){'' if e else ' at most'}")
    echo(
        f"# total: {'at most ' if not exact else ''}{total} request(s) to {len(gen.endpoints)} endpoint(s), "
        f"before repairs and retries; up to {total * gen.max_tokens} completion tokens."
    )
    gen.close()
    return {
        "random_requests": bodies,
        "counts": {t: c for t, (c, _) in counts.items()},
        "exact": exact,
        "total": total,
    }


__all__ = [
    "DEFAULT_RANDOM_TEMPLATE",
    "DEFAULT_VARIATION_TEMPLATE",
    "ON_TRUNCATED",
    "USAGE_COUNTERS",
    "APIRequestRejectedError",
    "APIUnavailableError",
    "CompletionError",
    "OpenAIChatGenerator",
    "dry_run",
    "from_options",
    "request_counts",
]
