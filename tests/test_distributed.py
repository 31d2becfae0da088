"""Data parallelism under torchrun (echokv.distributed): two gloo ranks on the CPU train the artifact and write the
results one process does; bad input and a failing rank stop every rank with a clear line and no output.

Each torchrun test starts two processes of the command line on the tiny random Llama (seconds each);
``--standalone`` lets torchrun pick a free port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import echokv
from echokv import cli, distributed
from echokv.config import TrainConfig
from echokv.training import check_data_parallel

SRC = str(Path(echokv.__file__).resolve().parents[1])
TRAIN = ["--model", "tiny-llama", "--no-progress", "--calib-tokens", "1024", "--seq-len", "128",
         "--heldout-tokens", "512", "--steps", "10", "--stage2-eval-every", "3", "--compression-ratio", "0.9"]
#: ratios at which stage 2 runs (at 0.5 the tiny model's mix is already lossless after stage 1)
VARIANTS = {"mix": ["--compression-ratio", "0.9"], "heads": ["--variant", "heads", "--compression-ratio", "0.5"]}
EVAL = ["--model", "tiny-llama", "--methods", "full,headdrop", "--compression-ratios", "0.5",
        "--tasks", "niah_single_1,perplexity", "--context-lengths", "500", "--samples", "2", "--peers", "off"]
#: what a run measures about itself, not about the method
TIMINGS = ("seconds", "prepare_seconds")


def torchrun(*args, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for name in distributed.TORCHRUN_ENV:
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_train_what_one_process_trains(tmp_path, variant):
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*TRAIN, *VARIANTS[variant]]
    assert cli.main(["train", *args, "--out", str(one)]) == 0
    proc = torchrun("-m", "echokv", "train", *args, "--out", str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone reports
    for name in ("network.safetensors", "network_stage1.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (one, two))
    assert ca["layout"] == cb["layout"] and ca["training"] == cb["training"]  # same widths / heads, same components
    assert ca["layout"]["variant"] == variant
    ra, rb = (json.loads((p / "train_report.json").read_text()) for p in (one, two))
    assert rb["data_parallel"] == {"processes": 2, "backend": "gloo"} and "data_parallel" not in ra
    assert ra["calibration_tokens"] == rb["calibration_tokens"] == 1024
    assert ra["heldout_tokens"] == rb["heldout_tokens"] == 512
    s2a, s2b = ra["stage2"], rb["stage2"]
    assert not s2a.get("skipped") and len(s2a["train_losses"]) == 10
    assert s2a["best_step"] == s2b["best_step"]  # the held-out error is summed: the ranks keep the same state
    torch.testing.assert_close(torch.tensor(s2b["train_losses"]), torch.tensor(s2a["train_losses"]), rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(torch.tensor(s2b["heldout_output_error_curve"]),
                               torch.tensor(s2a["heldout_output_error_curve"]), rtol=1e-5, atol=0)


def test_sharded_eval_writes_the_results_of_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["eval", *EVAL, "--out", str(one)]) == 0
    proc = torchrun("-m", "echokv", "eval", *EVAL, "--out", str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]

    def untimed(path):
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in json.loads(path.read_text())]

    rows = untimed(one / "results.json")
    assert rows == untimed(two / "results.json")
    assert len(rows) == 2 * 3 and all("score" in r for r in rows)  # 2 methods x (2 depths + perplexity)
    a, b = ([{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in p.read_text().splitlines()]
            for p in (one / "predictions.jsonl", two / "predictions.jsonl"))
    assert a == b and len(a) == 2 * 2
    assert (one / "report.md").read_text() == (two / "report.md").read_text()
    assert (one / "job.json").read_text() == (two / "job.json").read_text()


def test_more_processes_than_sequences_is_refused_before_work(tmp_path):
    out = tmp_path / "art"
    proc = torchrun("-m", "echokv", "train", *TRAIN, "--calib-tokens", "128", "--out", str(out))
    assert proc.returncode != 0
    assert "echokv: error: rank 0 of 2: torchrun started 2 processes" in proc.stderr
    assert "only 1 calibration" in proc.stderr and "--nproc-per-node 1" in proc.stderr
    assert str(Path(SRC) / "echokv") not in proc.stderr  # one line from each rank, no traceback of echokv's
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_failing_rank_stops_every_rank_and_writes_nothing(tmp_path):
    # rank 1 fails in stage 2 while rank 0 waits for it in a collective: both end, no artifact, no partial folder
    script = tmp_path / "inject.py"
    script.write_text(
        "import os, sys\n"
        "from echokv import cli, training\n"
        "if os.environ['RANK'] == '1':\n"
        "    def broken(*args, **kwargs):\n"
        "        raise RuntimeError('injected failure of rank 1')\n"
        "    training.stage2 = broken\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    work = tmp_path / "work"
    work.mkdir()
    proc = torchrun(str(script), "train", *TRAIN, "--out", str(work / "art"), timeout=180)
    assert proc.returncode != 0
    assert "injected failure of rank 1" in proc.stderr
    assert "rank      : 1" in proc.stderr  # torchrun's summary names the rank
    assert not list(work.iterdir())  # neither the artifact nor a hidden partial folder


def test_data_parallel_checks_without_processes():
    cfg = TrainConfig(calib_tokens=1024, seq_len=128, heldout_tokens=512, stage2_sequences=3)
    check_data_parallel(cfg, processes=1)
    check_data_parallel(cfg, processes=3)
    with pytest.raises(ValueError, match=r"started 4 processes.*8 calibration, 4 held-out, 3 stage-2 sequences: "
                                         r"start at most 3 \(--nproc-per-node 3\)"):
        check_data_parallel(cfg, processes=4)
    for variant in ("mix", "heads", "hybrid"):  # one trainer: every variant splits its sequences
        check_data_parallel(TrainConfig(variant=variant), processes=2)


def test_helpers_are_the_identity_in_one_process():
    assert not distributed.active() and distributed.size() == 1 and distributed.is_main()
    x = torch.randn(3)
    assert distributed.all_sum(x) is x and distributed.pooled_mean(x, 5) is x
    assert distributed.sum_float(1.5) == 1.5 and distributed.gather_json({"a": 1}) == [{"a": 1}]
    assert distributed.shard(5).tolist() == [0, 1, 2, 3, 4]


def test_other_commands_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["info", "--model", "tiny-llama"]) == 2
    assert "rank 1 of 2: echokv info does not run data-parallel; run it without torchrun" in capsys.readouterr().err
