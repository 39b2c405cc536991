"""Test tools for the OpenAI-compatible generator: a real `transformers serve` process and a fault-injecting proxy.

The proxy is a small HTTP/1.1 server on 127.0.0.1 (asyncio, in a background thread) that forwards
``POST /v1/chat/completions`` to a real server and injects faults at set rates:

* transport faults, drawn per arrival from a seeded RNG: ``"429"`` (answered at once with Retry-After),
  ``"500"``, ``"slow"`` (the server's answer held back ``slow_s`` seconds) and ``"drop"`` (the request is
  forwarded and answered by the server, then the connection is closed without an answer);
* content faults, drawn from the request body's hash (so a repeated request meets the same fault): ``"empty"``,
  ``"refused"``, ``"length"`` (finish_reason set to "length") and ``"non_text"`` (content null, a tool call).

It logs every request (canonical-JSON SHA-256 of the body, outcome, whether the Authorization header matched),
can demand an API key (401 otherwise), can answer 4xx to everything, can play a script of faults for the first
requests, and can hold every request after the first ``hold_after`` answers (for kill tests).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import httpx2
from _tiny_models import byte_bpe_tokenizer
from _tiny_models import tiny_gpt2

CORPUS = [
    "the cat sat on the mat",
    "a dog runs in the park",
    "rain falls on the old town",
    "the sun is warm today",
    "birds sing in the morning",
    "the river flows to the sea",
]


def body_hash(body: dict) -> str:
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- tiny model


def build_tiny_chat_lm(path: pathlib.Path) -> pathlib.Path:
    """A byte-level BPE tokenizer with a chat template and a one-layer GPT-2 trained briefly on CORPUS.

    Trained (150 Adam steps, about a second) so that it ends its answers with the EOS token: a real server then
    reports finish_reason "stop" for most answers, as a real model would.
    """
    import torch

    fast = byte_bpe_tokenizer(CORPUS)
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_gpt2(len(fast), n_positions=256)
    seqs = [
        fast(p + s)["input_ids"] + [0]
        for s in CORPUS
        for p in ("Write a sentence.\n", "Rewrite: the _ sat on _ mat\n", "")
    ]
    width = max(map(len, seqs))
    ids = torch.tensor([x + [0] * (width - len(x)) for x in seqs])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(threads)
    model.generation_config.do_sample = True
    model.generation_config.top_k = 0
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


class TransformersServer:
    """`transformers serve MODEL` on a free port of 127.0.0.1, as a subprocess."""

    def __init__(self, model_path: pathlib.Path, log_path: pathlib.Path):
        self.model = str(model_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        exe = pathlib.Path(sys.executable).with_name("transformers")
        cmd = (
            [str(exe)] if exe.exists() else [sys.executable, "-m", "transformers.cli.transformers"]
        )
        env = dict(
            os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
        )
        self._log = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [
                *cmd,
                "serve",
                self.model,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--device",
                "cpu",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("transformers serve did not answer /health in time")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# ------------------------------------------------------------------------------------------- proxy

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
}


class FaultProxy:
    """A loopback HTTP proxy in front of an OpenAI-compatible server, injecting faults at set rates."""

    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        rates: dict[str, float] | None = None,
        content_rates: dict[str, float] | None = None,
        retry_after: float = 0.2,
        slow_s: float = 1.0,
        api_key: str | None = None,
        status: int | None = None,
        hold_after: int | None = None,
        script: list[str] | None = None,
    ):
        self.upstream = upstream.rstrip("/")
        self.rng = random.Random(seed)
        self.rates = dict(rates or {})
        self.content_rates = dict(content_rates or {})
        self.retry_after = retry_after
        self.slow_s = slow_s
        self.api_key = api_key
        self.status = status
        self.hold_after = hold_after
        self.script = list(
            script or []
        )  # faults of the first arrivals, in order, before the rates apply
        self.log: list[dict] = []
        self.answered: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._release = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    # -- control
    def release(self) -> None:
        """Stops holding requests."""
        self.hold_after = None
        self._loop.call_soon_threadsafe(self._release.set)

    def stop(self) -> None:
        async def shutdown():
            self._server.close()
            self._release.set()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:  # open keep-alive connections and held requests
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._client.aclose()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def outcomes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.log:
            out[r["outcome"]] = out.get(r["outcome"], 0) + 1
        return out

    # -- server
    def _serve(self):
        asyncio.set_event_loop(self._loop)
        self._release = asyncio.Event()
        self._client = httpx2.AsyncClient(
            timeout=httpx2.Timeout(120, pool=None),
            limits=httpx2.Limits(max_connections=256),
            trust_env=False,
        )
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=512)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                keep = await self._respond(method, path, headers, raw, reader, writer)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            try:
                writer.close()
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _send(self, writer, status: int, payload: bytes, extra: dict | None = None):
        hdr = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
        ]
        hdr += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(hdr) + "\r\n\r\n").encode() + payload)
        await writer.drain()

    def _content_fault(self, h: str) -> str | None:
        u = int(hashlib.sha256((h + ":content").encode()).hexdigest()[:12], 16) / 16**12
        acc = 0.0
        for name, p in sorted(self.content_rates.items()):
            acc += p
            if u < acc:
                return name
        return None

    async def _respond(self, method, path, headers, raw, reader, writer) -> bool:
        if method != "POST" or not path.endswith("/chat/completions"):
            await self._send(writer, 404, b'{"error": "not found"}')
            return True
        body = json.loads(raw)
        h = body_hash(body)
        auth_ok = self.api_key is None or headers.get("authorization") == f"Bearer {self.api_key}"
        rec = {"hash": h, "outcome": None, "auth_ok": auth_ok, "t": time.monotonic()}
        self.log.append(rec)
        if not auth_ok:
            rec["outcome"] = "401"
            # Echo the credential as some real servers do, so the client must redact it from its errors.
            echo = json.dumps(
                {"error": {"message": f"invalid api key {headers.get('authorization')}"}}
            )
            await self._send(writer, 401, echo.encode())
            return True
        if self.status is not None:
            rec["outcome"] = str(self.status)
            await self._send(writer, self.status, b'{"error": {"message": "refused by test"}}')
            return True
        if self.hold_after is not None and len(self.answered) >= self.hold_after:
            rec["outcome"] = "held"
            await self._release.wait()
            await asyncio.sleep(0.05)
            if reader.at_eof():  # its client is gone (killed while this request was held)
                return False
        u, fault, acc = self.rng.random(), None, 0.0
        for name, p in sorted(self.rates.items()):
            acc += p
            if u < acc:
                fault = name
                break
        if self.script:
            fault = self.script.pop(0) or None
        if fault == "429":
            rec["outcome"] = "429"
            await self._send(
                writer, 429, b'{"error": "slow down"}', {"Retry-After": f"{self.retry_after:g}"}
            )
            return True
        if fault == "500":
            rec["outcome"] = "500"
            await self._send(writer, 500, b'{"error": "boom"}')
            return True
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            up = await self._client.post(self.upstream + "/chat/completions", json=body)
        finally:
            self.in_flight -= 1
        payload = up.content
        if fault == "drop":
            rec["outcome"] = "drop"
            writer.transport.abort()
            return False
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        content_fault = self._content_fault(h) if up.status_code == 200 else None
        if up.status_code == 200:  # what the server itself answered, before any injected fault
            choice = json.loads(payload)["choices"][0]
            rec["server_finish"] = choice.get("finish_reason")
            rec["server_empty"] = not (choice["message"].get("content") or "").strip()
        if content_fault is not None:
            data = json.loads(payload)
            msg = data["choices"][0]["message"]
            if content_fault == "empty":
                msg["content"] = ""
            elif content_fault == "refused":
                msg["content"], msg["refusal"] = None, "I cannot help with that."
            elif content_fault == "length":
                data["choices"][0]["finish_reason"] = "length"
            elif content_fault == "non_text":
                msg["content"] = None
                msg["tool_calls"] = [
                    {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ]
            payload = json.dumps(data).encode()
        try:
            await self._send(writer, up.status_code, payload)
        except (ConnectionError, OSError):
            rec["outcome"] = "client gone"
            return False
        rec["outcome"] = (fault or "ok") + (f"+{content_fault}" if content_fault else "")
        if up.status_code == 200:
            self.answered.append(h)
        return True
