"""Data parallelism under ``torchrun``: the process group and the few collectives training and evaluation use.

``torchrun --nproc-per-node N -m echokv train|eval ...`` starts N copies of the command; each reads its rank
from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and
joins one process group: NCCL when the model runs on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU.
Training splits its calibration and held-out sequences over the ranks and sums what it learns from them
(moments, error sums, gradients), so every rank takes the same decisions and rank 0 writes the artifact that
one process would have; evaluation splits its result rows (see :mod:`echokv_lab.eval.runner`).

Outside a process group of two or more ranks every helper here hands its input back untouched, so a single
process computes exactly what it did before this module existed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import timedelta

import torch

#: the environment torchrun sets for every rank (and that a child process must not inherit)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE")


class PeerLost(RuntimeError):
    """A collective failed because another rank stopped (its own error says why)."""


def _collective(op, *args) -> None:
    try:
        op(*args)
    except RuntimeError as exc:  # gloo: "Connection reset by peer"; NCCL: a DistBackendError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:200]
        raise PeerLost("another process of this torchrun run stopped, so this one stops too and writes nothing; "
                       f"that process's own error says why ({first})") from exc


#: how long a rank waits in a collective for the others. Evaluation gathers after every method, and one rank's
#: share of a long suite (or rank 0's peers run) can take hours; a rank that dies is noticed at once regardless
#: (its connections close), so only a hung rank waits this long
WAIT = timedelta(hours=24)


def launched() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of two or more ranks is up (the helpers below then communicate)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one that prints and writes."""
    return rank() == 0


def rank_device(device: str) -> str:
    """The device of this rank for ``--device``: ``cuda`` becomes ``cuda:LOCAL_RANK``; ``cpu`` stays. A device
    with an index would put every rank on one GPU: refused."""
    if device == "cpu":
        return device
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    raise ValueError(f"--device {device} under torchrun: pass --device cuda (rank i runs on cuda:i of its node) "
                     "or --device cpu")


def init(device: str) -> str:
    """Join torchrun's process group (NCCL for a CUDA device, gloo otherwise) and return this rank's device."""
    device = rank_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= torch.device(device).index:
            raise ValueError(f"--device cuda under torchrun: this rank needs {device}, but "
                             f"{torch.cuda.device_count()} CUDA device(s) are visible; pass --device cpu or start "
                             "at most that many processes per node")
        torch.cuda.set_device(torch.device(device))
    torch.distributed.init_process_group(backend=backend, timeout=WAIT)
    return device


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def backend() -> str | None:
    return torch.distributed.get_backend() if active() else None


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


# -- collectives (identity in one process) -----------------------------------------------------------------------
def all_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the ranks (a new tensor on ``x``'s device; ``x`` itself in one process)."""
    if not active():
        return x
    buf = x.detach().to(_comm_device(), copy=True)
    _collective(torch.distributed.all_reduce, buf)
    return buf.to(x.device)


def sum_float(x: float) -> float:
    """A number summed over the ranks."""
    return float(all_sum(torch.tensor([float(x)], dtype=torch.float64))[0]) if active() else x


def sum_int(x: int) -> int:
    return int(all_sum(torch.tensor([int(x)], dtype=torch.int64))[0]) if active() else x


def pooled_mean(mean: torch.Tensor, count: int) -> torch.Tensor:
    """The mean over every rank's rows from this rank's ``mean`` of ``count`` rows."""
    return all_sum(mean * count) / sum_int(count) if active() else mean


def sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over the ranks in one message (a rank whose share of a batch was empty
    contributes zeros). Each rank's loss is its share of the global loss, so the sum is the global gradient."""
    if not active():
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_sum(torch.cat([g.reshape(-1) for g in grads]))
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).to(p.dtype)


def barrier() -> None:
    """Wait for every rank (a rank that died instead makes the others fail here, not write)."""
    if active():
        _collective(torch.distributed.barrier)


def gather_json(obj) -> list:
    """Every rank's ``obj`` (JSON values), in rank order, on every rank; ``[obj]`` in one process. JSON, not
    pickle: nothing that crosses processes is executed."""
    if not active():
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)
    n = size()
    dev = _comm_device()
    lengths = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(n)]
    _collective(torch.distributed.all_gather, lengths, torch.tensor([len(data)], dtype=torch.int64, device=dev))
    longest = max(int(t) for t in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[: len(data)] = data.to(dev)
    out = [torch.empty(longest, dtype=torch.uint8, device=dev) for _ in range(n)]
    _collective(torch.distributed.all_gather, out, padded)
    return [json.loads(t[: int(k)].cpu().numpy().tobytes().decode("utf-8")) for t, k in zip(out, lengths)]


def shard(n: int) -> torch.Tensor:
    """The indices of ``n`` items this rank takes (every ``size()``-th, from its rank)."""
    return torch.arange(rank(), n, size())
