"""Corrupt or mismatched artifacts: every problem is an ArtifactError that names the file, raised before a model is
loaded (issue #16, "Corrupt artifacts"), including for any random corruption or truncation of its files."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from echokv import artifact
from echokv.artifact import ArtifactError, validate_artifact
from echokv.tiny import tiny_model
from helpers import train_tiny


@pytest.fixture(scope="module")
def model():
    return tiny_model()


#: the variants' ratios on the float32 tiny model (the hybrid's keys keep at most half of a float32 cache)
RATIOS = {"mix": 0.5, "heads": 0.5, "hybrid": 0.7}


def _train(model, variant):
    return train_tiny(model, steps=0, variant=variant, compression_ratio=RATIOS[variant])


@pytest.fixture(scope="module", params=list(RATIOS))
def saved(request, model, tmp_path_factory):
    recon, report = _train(model, request.param)
    path = tmp_path_factory.mktemp("art") / request.param
    artifact.save(recon, model, path, report)
    return path


def _without_checksums(src: Path, dst: Path) -> Path:
    """``src`` as artifacts were written before checksums: no ``checksums`` in config.json, weights whose format
    says none."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    config = json.loads((dst / artifact.CONFIG).read_text())
    del config["checksums"]
    (dst / artifact.CONFIG).write_text(json.dumps(config))
    for name in artifact.STAGE_FILES.values():
        if (dst / name).is_file():
            save_file(load_file(str(dst / name)), str(dst / name), metadata={"format": artifact.FORMAT})
    return dst


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _refused(path, model, match: str) -> None:
    with pytest.raises(ArtifactError, match=match):
        validate_artifact(path)
    with pytest.raises(ArtifactError, match=match):
        artifact.load(path, model)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"network.safetensors: .*(not a readable safetensors|does not match the checksum)"),
        (b"\x80\x03}q\x00.", r"network.safetensors: .*(not a readable safetensors|does not match the checksum)"),
        (bytes(range(256)) * 8, r"network.safetensors: .*(not a readable safetensors|does not match)"),
    ],
    ids=["empty", "pickle", "random-bytes"],
)
def test_weights_that_are_not_safetensors(saved, model, tmp_path, content, match):
    path = _copy(saved, tmp_path)
    (path / artifact.WEIGHTS).write_bytes(content)
    _refused(path, model, match)


def test_truncated_weights(saved, model, tmp_path):
    path = _copy(saved, tmp_path)
    data = (path / artifact.WEIGHTS).read_bytes()
    (path / artifact.WEIGHTS).write_bytes(data[: len(data) // 2])
    _refused(path, model, "network.safetensors: .*(truncated or corrupt)")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: [1, 2, 3], r"config.json: holds a JSON list, not the object"),
        (lambda c: {k: v for k, v in c.items() if k != "layout"}, r"config.json: lacks the 'layout' object"),
        (lambda c: {**c, "layout": {"layers": [0]}}, r"config.json: has a malformed 'layout' \(KeyError"),
        (lambda c: {**c, "head_dim": 32}, r"config.json: says head_dim 32, but its model geometry has head_dim 16"),
        (lambda c: {**c, "head_dim": 32, "model": {**c["model"], "geometry": {**c["model"]["geometry"], "head_dim": 32}}},
         (r"(network.safetensors: tensor groups.0.\w+ is F32 \[.*\], but config.json's layout and head_dim 32 "
         r"need|config.json: has a layout of 2 KV heads of 16 for a model of 2 of 32)")),  # heads: a mixes layout
        (lambda c: {**c, "format": "something/2"}, r"config.json: has format 'something/2'"),
        (lambda c: {**c, "model": "smollm2"}, r"config.json: lacks the 'model' object"),
        (lambda c: {**c, "bias": "yes"}, r"config.json: has a 'bias' that is not true or false"),
    ],
    ids=["list", "no-layout", "bad-layout", "head_dim", "head_dim-and-geometry", "format", "model", "bias"],
)
def test_config_of_the_wrong_shape(saved, model, tmp_path, edit, match, monkeypatch):
    # rewritten on purpose (a new checksum), so that the shape checks themselves are what refuses
    path = _copy(saved, tmp_path)
    config = json.loads((path / artifact.CONFIG).read_text())
    new = edit(config)
    if isinstance(new, dict):
        artifact.rewrite_config(path, new)
    else:
        (path / artifact.CONFIG).write_text(json.dumps(new))
    _refused(path, model, match)


def test_an_edited_config_is_refused_unless_rewritten_on_purpose(saved, model, tmp_path):
    path = _copy(saved, tmp_path)
    config = json.loads((path / artifact.CONFIG).read_text())
    config["model"]["name"] = "renamed"
    (path / artifact.CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    _refused(path, model, r"config.json: does not match the checksum .*rewrite_config")
    artifact.rewrite_config(path, config)
    assert artifact.load(path, model) is not None


def test_the_folder_itself(saved, tmp_path):
    with pytest.raises(ArtifactError, match=r"config.json is a file, not an artifact folder.*pass the folder that holds"):
        validate_artifact(saved / artifact.CONFIG)
    with pytest.raises(ArtifactError, match="artifact folder not found"):
        validate_artifact(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / artifact.CONFIG).write_text("{}")
    with pytest.raises(ArtifactError, match="network.safetensors is missing"):
        validate_artifact(tmp_path / "a")
    with pytest.raises(TypeError, match="an artifact is a folder path"):
        validate_artifact(None)


def test_stage_must_be_one_or_two(saved, model, tmp_path):
    # issue #16: artifact.load(A, model, stage=3) loaded the stage-1 weights
    for stage in (3, 0, True, "2"):
        with pytest.raises(ValueError, match="stage must be 2 .* or 1"):
            artifact.load(saved, model, stage=stage)
    assert artifact.load(saved, model, stage=1) is not None
    path = _copy(saved, tmp_path)
    (path / artifact.STAGE1_WEIGHTS).unlink()
    with pytest.raises(ArtifactError, match="network_stage1.safetensors: is missing, but the artifact was"):
        artifact.load(path, model, stage=1)


def test_artifacts_without_checksums_still_load_and_are_shape_checked(saved, model, tmp_path):
    old = _without_checksums(saved, tmp_path / "written" / "old")
    assert validate_artifact(old)["format"] == artifact.FORMAT
    artifact.load(old, model)
    from safetensors.torch import load_file, save_file

    path = _copy(old, tmp_path)
    state = load_file(str(path / artifact.WEIGHTS))
    name = next(iter(state))
    state[name] = state[name][..., :-1].contiguous()  # one column short: nothing but the shape check can see it
    save_file(state, str(path / artifact.WEIGHTS), metadata={"format": artifact.FORMAT})
    with pytest.raises(ArtifactError, match=rf"tensor {name} is F32 .* need F32"):
        validate_artifact(path)


def _old_names(src: Path, dst: Path) -> Path:
    """``src`` as artifacts were named before the network's files were: ``reconstructor*.safetensors``, its
    checksums recorded under those names."""
    shutil.copytree(src, dst)
    config = json.loads((dst / artifact.CONFIG).read_text())
    for new, old in artifact.OLD_NAMES.items():
        if (dst / new).is_file():
            (dst / new).rename(dst / old)
            if "checksums" in config:
                config["checksums"][old] = config["checksums"].pop(new)
    artifact.rewrite_config(dst, config)
    return dst


def test_artifacts_with_the_old_file_names_still_load_and_are_checked(saved, model, tmp_path):
    old = _old_names(saved, tmp_path / "named")
    assert not (old / artifact.WEIGHTS).exists() and (old / artifact.OLD_NAMES[artifact.WEIGHTS]).is_file()
    fresh = artifact.load(saved, model).state_dict()
    loaded = artifact.load(old, model).state_dict()
    assert all(torch.equal(fresh[k], loaded[k]) for k in fresh)
    assert artifact.weights_checksum(old, validate_artifact(old)) == artifact.weights_checksum(saved)
    data = bytearray((old / artifact.OLD_NAMES[artifact.WEIGHTS]).read_bytes())
    data[-1] ^= 1
    (old / artifact.OLD_NAMES[artifact.WEIGHTS]).write_bytes(bytes(data))
    _refused(old, model, r"reconstructor.safetensors: does not match the checksum")


def test_float16_load_of_the_same_model_matches(model, saved, tmp_path):
    # issue #16: a float16 load said "trained on a different model": float16 rounds the weights, and bfloat16
    # rounding of those differs from that of the float32 weights. The fingerprint is now also taken through
    # float16; artifacts written before say the dtype instead.
    import copy

    half, bf16 = copy.deepcopy(model).half(), copy.deepcopy(model).bfloat16()
    assert artifact.fingerprint(half) != artifact.fingerprint(model)
    artifact.load(saved, half)
    artifact.load(saved, bf16)
    path = _copy(saved, tmp_path)
    config = json.loads((path / artifact.CONFIG).read_text())
    del config["model"]["kv_fingerprint_fp16"]  # as written before
    artifact.rewrite_config(path, config)
    artifact.load(path, bf16)
    with pytest.raises(ArtifactError, match=r"loaded in float16, do not match .* \(in float32.*--dtype float32"):
        artifact.load(path, half)
    with pytest.raises(ArtifactError, match="trained on a different model"):
        artifact.load(saved, tiny_model(seed=3))


# -- any corruption is refused, never another exception, never a load ---------------------------------------

_FILES = [artifact.CONFIG, artifact.WEIGHTS]
_SAVED: dict[str, Path] = {}


def _fresh(model) -> Path:
    """One artifact per variant for the property tests, written once."""
    if not _SAVED:
        root = Path(tempfile.mkdtemp(prefix="echokv-prop-"))
        for variant in RATIOS:
            recon, report = _train(model, variant)
            _SAVED[variant] = artifact.save(recon, model, root / variant, report)
            _SAVED[variant + "-old"] = _without_checksums(_SAVED[variant], root / (variant + "-old"))
    return _SAVED


corruption = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                        min_size=1, max_size=4)),
)


def _corrupt(data: bytes, how) -> bytes:
    kind, arg = how
    if kind == "truncate":
        return data[: int(arg * len(data))]
    out = bytearray(data)
    for where, xor in arg:
        out[int(where * len(out))] ^= xor  # xor with a non-zero byte
    assume(bytes(out) != data)  # two flips of one byte may undo each other
    return bytes(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(variant=st.sampled_from(list(RATIOS)), name=st.sampled_from(_FILES), how=corruption)
def test_any_corruption_is_an_artifact_error(model, variant, name, how):
    src = _fresh(model)[variant]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a"
        shutil.copytree(src, path)
        (path / name).write_bytes(_corrupt((src / name).read_bytes(), how))
        with pytest.raises(ArtifactError) as exc:
            validate_artifact(path)
        assert str(path) in str(exc.value)
        with pytest.raises(ArtifactError):
            artifact.load(path, model)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(variant=st.sampled_from(list(RATIOS)), name=st.sampled_from(_FILES), how=corruption)
def test_corrupting_an_artifact_without_checksums_never_raises_anything_else(model, variant, name, how):
    # artifacts written before checksums: a changed number may go unseen, but truncation never does, and
    # nothing but ArtifactError ever comes out
    src = _fresh(model)[variant + "-old"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a"
        shutil.copytree(src, path)
        (path / name).write_bytes(_corrupt((src / name).read_bytes(), how))
        try:
            artifact.load(path, model)
        except ArtifactError:
            return
        assert how[0] == "flip", "a truncated file was loaded"


def test_checksums_removed_from_config_are_seen_in_the_weights(saved, tmp_path):
    # the weights' format says the artifact was written with checksums, so deleting them from config.json is refused
    from safetensors import safe_open

    path = _copy(saved, tmp_path)
    with safe_open(str(path / artifact.WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": artifact.FORMAT + artifact.WITH_CHECKSUMS}  # one key: it opens the file
    config = json.loads((path / artifact.CONFIG).read_text())
    del config["checksums"]
    (path / artifact.CONFIG).write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="has no 'checksums', yet network.safetensors was written with them"):
        validate_artifact(path)
