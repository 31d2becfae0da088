"""Method registry: ``full``, ``echokv`` (stage 1+2 and stage-1-only), ``echokv-hybrid`` and the baselines.

``make_method("echokv", 0.5, artifacts=[...])`` picks the artifact trained for that ratio; without
one, an artifact is trained on the fly with default settings (minutes) and kept in ``work_dir``.
``echokv`` / ``echokv-s1`` take head-only artifacts, ``echokv-hybrid`` hybrid ones (``--variant hybrid``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .baselines import BASELINES, KVPRESS_PRESSES, kvpress_available
from .baselines.base import Calibration, Method, MethodUnavailable
from .cache import EchoCodec
from .selection import check_ratio


@dataclass
class EchoKVMethod(Method):
    """EchoKV (arXiv 2603.22910): retained heads + the trained reconstructor of an artifact."""

    name: str = "echokv"
    artifact: str | None = None
    stage: int = 2
    work_dir: str | None = None
    train_overrides: dict = field(default_factory=dict)

    def prepare(self, model, tokenizer, calibration: Calibration | None) -> None:
        from . import artifact as art

        if self.artifact is None:
            self.artifact = _train_on_the_fly(model, tokenizer, self.compression_ratio, self.work_dir, self.train_overrides)
        self._recon = art.load(self.artifact, model, stage=self.stage)

    def make_codec(self, model):
        return EchoCodec(self._recon)


def _train_on_the_fly(model, tokenizer, ratio: float, work_dir, overrides) -> str:
    from . import artifact as art
    from .training import TrainConfig, train

    variant = overrides.get("variant", "hybrid")
    out = Path(work_dir or "runs") / f"echokv-{'hybrid-' if variant == 'hybrid' else ''}artifact-{ratio:g}"
    if out.exists():
        try:
            art.check_compatible(art.read_config(out), model, str(out))
            return str(out)
        except art.ArtifactError:
            pass
    print(f"[echokv] no artifact for compression ratio {ratio:g}: training one into {out}")
    recon, report = train(model, tokenizer, TrainConfig(compression_ratio=ratio, **overrides))
    art.save(recon, model, out, report, overwrite=True)
    return str(out)


def artifacts_at(artifacts: list[str] | None, ratio: float, hybrid: bool | None = None) -> list[str]:
    """The artifact folders trained for ``ratio`` (and, unless None, of the hybrid or echo variant)."""
    from .artifact import config_is_hybrid, config_ratio, read_config

    configs = {a: read_config(a) for a in artifacts or []}
    return [a for a, c in configs.items()
            if abs(config_ratio(c) - ratio) < 1e-9 and (hybrid is None or config_is_hybrid(c) == hybrid)]


def known_methods() -> list[str]:
    return ["full", "echokv", "echokv-s1", "echokv-hybrid", *BASELINES, *(f"kvpress:{p}" for p in KVPRESS_PRESSES)]


def available_methods() -> list[str]:
    """Every method that can run in this environment (kvpress ones need the peers extra)."""
    return [m for m in known_methods() if not m.startswith("kvpress:") or kvpress_available()]


def parse_methods(spec: str) -> list[str]:
    """'full,echokv,...' or 'all' -> method names; unknown names raise listing the known ones."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return available_methods()
    known = known_methods()
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; known methods: {', '.join(known)}, or 'all'")
    if not names:
        raise ValueError("no method given; known methods: " + ", ".join(known))
    return names


def make_method(name: str, ratio: float, artifacts: list[str] | None = None, work_dir: str | None = None) -> Method:
    check_ratio(ratio)
    if name == "full":
        return Method(0.0)
    if name in ("echokv", "echokv-s1", "echokv-hybrid"):
        hybrid = name == "echokv-hybrid"
        same_ratio = artifacts_at(artifacts, ratio)
        match = artifacts_at(same_ratio, ratio, hybrid)
        if same_ratio and not match:
            # the user handed an artifact for this ratio: training another one silently would surprise them
            have, want = ("hybrid", "echo") if not hybrid else ("echo", "hybrid")
            raise ValueError(
                f"{name}@{ratio:g}: artifact {same_ratio[0]} is the {have!r} variant but {name} needs the "
                f"{want!r} variant; train one with `echokv train --variant {want} --compression-ratio {ratio:g}` "
                f"and pass it too (or use method {'echokv-hybrid' if have == 'hybrid' else 'echokv'})"
            )
        return EchoKVMethod(
            ratio, name=name, artifact=match[0] if match else None, stage=1 if name == "echokv-s1" else 2,
            work_dir=work_dir, train_overrides={"variant": "hybrid" if hybrid else "echo"},
        )
    if name.startswith("kvpress:"):
        if not kvpress_available():
            raise MethodUnavailable(
                f"{name} needs kvpress: install the peers environment (pip install 'echokv[peers]', "
                "transformers 5.2.x)"
            )
        from .baselines.kvpress_press import KVPressMethod

        return KVPressMethod(ratio, name=name, press=name.split(":", 1)[1])
    if name == "headdrop":  # the same retained heads as a head-only EchoKV artifact of this ratio, if given
        echo = artifacts_at(artifacts, ratio, hybrid=False)
        return BASELINES[name](ratio, artifact=echo[0] if echo else None)
    if name in BASELINES:
        return BASELINES[name](ratio)
    raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
