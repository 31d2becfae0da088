"""The configuration dataclasses make the command line: every field is a flag, and the defaults agree."""

from __future__ import annotations

import dataclasses

import pytest

from echokv import cli
from echokv.cli._args import flags, from_args
from echokv.config import TrainConfig

REQUIRED = {"out": "x", "artifact": "a", "prompt": "hi"}


def _subparser(name: str):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


def _required_args(module) -> list[str]:
    args = []
    for cls in module.CONFIGS:
        for field in dataclasses.fields(cls):
            required = field.default is dataclasses.MISSING or field.metadata.get("one_of")
            if required and field.name in REQUIRED and flags(field)[0] not in args:
                args += [flags(field)[0], REQUIRED[field.name]]
    return args


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_field_is_a_flag_with_its_default(name):
    module = cli.COMMANDS[name]
    parser = _subparser(name)
    dests = {a.dest: a for a in parser._actions}
    args = parser.parse_args(_required_args(module))
    for cls in module.CONFIGS:
        for field in dataclasses.fields(cls):
            assert field.name in dests, f"{cls.__name__}.{field.name} has no flag"
            assert set(flags(field)) <= set(dests[field.name].option_strings)
            if field.default is not dataclasses.MISSING and not field.metadata.get("one_of"):
                assert getattr(args, field.name) == field.default, field.name
        built = from_args(args, cls)
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        assert {k: v for k, v in dataclasses.asdict(built).items() if k in defaults and k not in REQUIRED} == {
            k: v for k, v in defaults.items() if k not in REQUIRED}


def test_train_flags_reach_every_training_field():
    args = _subparser("train").parse_args([
        "--compression-ratio", "0.7", "--k-ratio", "0.6", "--v-ratio", "0.8", "--layout", "paper", "--variant",
        "heads", "--keys", "pre-rope", "--widths", "8", "--key-weight", "2", "--quant-group", "32",
        "--stage2-eval-every", "5", "-S", "2", "--m", "1", "--inputs", "all", "--calib-tokens", "1024", "--seq-len", "128",
        "--heldout-tokens", "256", "--stage2-sequences", "3", "--steps", "7", "--lr", "0.01", "--stage2-batch",
        "4", "--stage2-queries", "32", "--ridge", "0.1", "--no-bias", "--seed", "5", "--text", "a.txt", "b.txt",
        "--no-progress", "--out", "x",
    ])
    cfg = from_args(args, TrainConfig)
    assert cfg == TrainConfig(
        compression_ratio=0.7, k_ratio=0.6, v_ratio=0.8, layout="paper", variant="heads", keys="pre-rope",
        widths="8", key_weight=2.0, quant_group=32, stage2_eval_every=5, group_size=2, m=1,
        inputs="all", calib_tokens=1024, seq_len=128, heldout_tokens=256, stage2_sequences=3, stage2_steps=7,
        stage2_lr=0.01, stage2_batch=4, stage2_queries=32, ridge=0.1, bias=False, seed=5,
        text_paths=["a.txt", "b.txt"], progress=False,
    )
    # every field was set to something other than its default, so none is unreachable
    assert all(getattr(cfg, f.name) != f.default for f in dataclasses.fields(TrainConfig))


def test_help_states_the_defaults():
    text = _subparser("train").format_help()
    assert "(default: 0.5)" in text and "--steps" in text and "-S" in text
