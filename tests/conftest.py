"""Shared fixtures: the real embedded SmolLM2-135M (loaded once) and artifacts trained for it (helpers.py has
the helpers tests import)."""

from __future__ import annotations

import pytest
import torch

from helpers import train_cli

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct in bfloat16 (the commands' default, so the dtype the
    shared artifacts are trained in) on CPU (~20 s, once)."""
    from echokv.models import load_model

    return load_model("smollm2-135m", dtype="bfloat16")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """Only the tokenizer of the embedded model (a few seconds)."""
    from transformers import AutoTokenizer

    from echokv.models import embedded_gguf_path

    path = embedded_gguf_path("smollm2-135m")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory):
    """A small ratio-0.5 artifact (the defaults: mix, bfloat16; 20 stage-2 steps) trained through `echokv train`."""
    out = tmp_path_factory.mktemp("artifact") / "smollm2-0.5"
    train_cli(out, "--steps", "20")
    return out


@pytest.fixture(scope="session")
def smollm2_heads_artifact(tmp_path_factory):
    """A ratio-0.5 head-only EchoKV artifact (data layout), stage 1 only (the cheapest real one)."""
    out = tmp_path_factory.mktemp("artifact") / "smollm2-heads-0.5"
    train_cli(out, "--variant", "heads", "--steps", "0")
    return out

