"""EchoKV as an evaluated method: the artifact trained for the ratio (or one trained on the spot).

Names (the registry): ``echokv`` is what ``echokv train`` makes by default
(:data:`~echokv.config.DEFAULT_VARIANT`), ``echokv-mix`` / ``echokv-heads`` / ``echokv-hybrid`` each variant by
name (``-s1``: with the stage-1, closed-form weights).

:meth:`EchoKVMethod.from_artifacts` picks, among the run's artifacts, the one trained for the method's ratio and
variant; without one, :func:`train_or_reuse` trains one with default settings (minutes) into ``work_dir`` and
reuses it in later runs (``echokv demo`` goes through the same helper).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from echokv import artifact as art
from echokv.codecs.mix import MixCodec
from echokv.config import DEFAULT_VARIANT, TrainConfig
from echokv.training import artifact_dir, train_or_reuse
from echokv_lab.methods.base import Method, register

log = logging.getLogger(__name__)

#: name -> (variant, stage)
NAMES = {
    "echokv": (DEFAULT_VARIANT, 2),
    "echokv-mix": ("mix", 2),
    "echokv-mix-s1": ("mix", 1),
    "echokv-heads": ("heads", 2),
    "echokv-heads-s1": ("heads", 1),
    "echokv-hybrid": ("hybrid", 2),
}


@dataclass
class EchoKVMethod(Method):
    """EchoKV (arXiv 2603.22910): the stored components (or retained heads) and the trained decoders of an
    artifact."""

    name: str = "echokv"
    variant: str = DEFAULT_VARIANT
    stage: int = 2
    artifact: str | None = None
    work_dir: str | None = None

    @classmethod
    def create(cls, ratio, artifacts=None, **kwargs):
        return cls.from_artifacts(artifacts, ratio, **kwargs)

    @classmethod
    def from_artifacts(cls, paths: list[str] | None, ratio: float, variant: str = DEFAULT_VARIANT, **kwargs):
        """The method with the artifact of ``paths`` trained for ``ratio`` and ``variant`` (none: trained on the
        spot by :meth:`prepare`). An artifact for this ratio of another variant is an error: training another
        one silently would surprise the user who handed it."""
        name = kwargs.get("name", cls.name)
        same_ratio = artifacts_at(paths, ratio)
        match = artifacts_at(same_ratio, ratio, variant)
        if same_ratio and not match:
            raise ValueError(wrong_variant(name, ratio, same_ratio[0], art.config_variant(art.read_config(same_ratio[0])),
                                           variant))
        return cls(ratio, variant=variant, artifact=match[0] if match else None, **kwargs)

    def prepare(self, model, tokenizer, calibration) -> None:
        if self.artifact is None:
            config = TrainConfig(compression_ratio=self.compression_ratio, variant=self.variant)
            folder = artifact_dir(self.work_dir or "runs", config)
            self.artifact, _ = train_or_reuse(model, tokenizer, folder, config)
        self._network = art.load(self.artifact, model, stage=self.stage)

    def make_codec(self, model):
        return MixCodec(self._network, model)

    @property
    def achieved_kept_fraction(self) -> float:
        return self._network.layout.kept_fraction()

    def parameter_bytes(self) -> int:
        return self._network.num_bytes()

    def info(self) -> dict:
        return {**super().info(), "variant": self.variant, "stage": self.stage, "artifact": self.artifact,
                "width_counts": {str(w): n for w, n in self._network.layout.width_counts().items()}}


for _name, (_variant, _stage) in NAMES.items():
    register(_name, variant=_variant, stage=_stage)(EchoKVMethod)


def wrong_variant(name: str, ratio: float, path: str, have: str, variant: str) -> str:
    """The one line for an artifact of ``ratio`` that is not the variant method ``name`` needs."""
    other = next((n for n, (v, stage) in NAMES.items() if v == have and stage == 2), None)
    return (f"{name}@{ratio:g}: artifact {path} is the {have!r} variant but {name} needs the {variant!r} variant; "
            f"train one with `echokv train --variant {variant} --compression-ratio {ratio:g}` and pass it too"
            + (f" (or use method {other})" if other else ""))


def artifacts_at(paths: list[str] | None, ratio: float, variant: str | None = None) -> list[str]:
    """The artifact folders trained for ``ratio`` (and, unless None, of ``variant``)."""
    configs = {a: art.read_config(a) for a in paths or []}
    return [a for a, c in configs.items()
            if abs(art.config_ratio(c) - ratio) < 1e-9 and (variant is None or art.config_variant(c) == variant)]


def artifact_notes(name: str, ratios: list[float], configs: list[dict]) -> list[str]:
    """What method ``name`` will do at ``ratios`` with the run's artifacts (their ``config.json``): train one on
    the spot, or report an error for an artifact of another variant. Nothing for other methods."""
    if name not in NAMES:
        return []
    variant = NAMES[name][0]
    trained = {round(art.config_ratio(c), 9) for c in configs}
    have = {round(art.config_ratio(c), 9) for c in configs if art.config_variant(c) == variant}
    missing = [r for r in ratios if round(r, 9) not in trained]
    wrong = [r for r in ratios if round(r, 9) in trained - have]
    notes = []
    if missing:
        notes.append(f"{name}: no artifact for compression ratio(s) {', '.join(f'{r:g}' for r in missing)}; one "
                     "is trained on the fly (minutes; kept in runs/ for later runs)")
    if wrong:
        notes.append(f"{name}: the artifact for ratio(s) {', '.join(f'{r:g}' for r in wrong)} is another variant "
                     f"than {variant!r}; {name} reports an error there, the other methods run")
    return notes
