"""A local vLLM server from ``.venv-serve`` for tests and measurements: started on 127.0.0.1, asked over HTTP
(standard library only), always stopped.

vLLM binds its port with SO_REUSEPORT: a second server on a busy port starts without error and silently takes
part of the requests. :class:`Server` therefore refuses a port something already answers on, and stops its
server's whole process group on exit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

#: the repository's serving environment (bash scripts/setup.sh serve)
SERVE_VENV = Path(__file__).resolve().parents[3] / ".venv-serve"

#: small settings for a 2-core CPU machine: 1 GiB of KV cache, eager mode (startup ~20 s instead of ~76 s)
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "1", "VLLM_TARGET_DEVICE": "cpu",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


#: tokens per cache block (vLLM's CPU default, set explicitly so that block counts are known)
BLOCK_SIZE = 128


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``with Server(model_folder, log) as srv: srv.complete(ids, 16)``.

    ``args``: more ``vllm serve`` arguments (:func:`echokv.serving.vllm.serve_args` for compressed mode).
    """

    def __init__(self, model, log, args=(), port: int | None = None, dtype: str = "float32",
                 max_model_len: int = 4096, max_num_seqs: int = 8, venv: Path = SERVE_VENV, timeout: float = 600):
        self.port = port or free_port()
        self.log, self.timeout = Path(log), timeout
        self.cmd = [str(venv / "bin" / "vllm"), "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                    "--served-model-name", "served", "--dtype", dtype, "--max-model-len", str(max_model_len),
                    "--max-num-seqs", str(max_num_seqs), "--block-size", str(BLOCK_SIZE), "--seed", "0", "--enforce-eager", *args]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        if port_in_use(self.port):
            raise RuntimeError(f"port {self.port} is in use (a stale server would silently take requests): stop it")
        with self.log.open("w") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **ENV})
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with status {self.proc.returncode}: {self.last_line()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve did not answer within {self.timeout:.0f} s (log: {self.log})")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the API server and its engine-core process
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def last_line(self) -> str:
        lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        return lines[-1] if lines else ""

    def kv_cache_tokens(self) -> int:
        """Tokens of KV cache the engine reported at start-up (blocks: this over :data:`BLOCK_SIZE`)."""
        found = re.findall(r"KV cache size: ([\d,]+) tokens", self.log.read_text(errors="replace"))
        if not found:
            raise RuntimeError(f"no KV cache size in {self.log}")
        return int(found[-1].replace(",", ""))

    def post(self, path: str, body: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def complete(self, prompt, max_tokens: int, **extra) -> dict:
        """Greedy completion of ``prompt`` (text or token ids): the first choice (``text``, ``token_ids``)."""
        body = {"model": "served", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "return_token_ids": True, **extra}
        return self.post("/v1/completions", body)["choices"][0]
