"""Methods compared at equal KV memory, kvpress-style: one dataclass per file, one registry.

``make_method(name, ratio, artifacts=..., **kw)`` makes the registered method (:data:`REGISTRY`, filled by
``register("name")`` at the end of each file): ``full``; ``echokv``, ``echokv-mix``, ``echokv-heads``,
``echokv-hybrid`` (and ``-s1`` forms) (:mod:`~echokv_lab.methods.echokv`); the baselines ``headdrop``, ``lowrank``, ``xlayer-svd``,
``quant``; kvpress's presses as ``kvpress:<press>`` (peers environment).
"""

from __future__ import annotations

from echokv.selection import check_ratio

# isort: off
# importing a method file registers its names; this order is the order methods are listed and run in
from echokv_lab.methods import full, echokv, echokv_q, headdrop, lowrank, xlayer_svd, quant, hf_quant, kvpress  # noqa: F401
# isort: on
from echokv_lab.methods.base import REGISTRY, Method, MethodUnavailable, register
from echokv_lab.methods.echokv import EchoKVMethod
from echokv_lab.methods.kvpress import kvpress_available

__all__ = ["REGISTRY", "EchoKVMethod", "Method", "MethodUnavailable", "available_methods", "known_methods",
           "make_method", "parse_methods", "register"]


def known_methods() -> list[str]:
    return list(REGISTRY)


def available_methods() -> list[str]:
    """Every method that can run in this environment (kvpress ones need the peers extra), each once: a name
    that stands for the same method as an earlier one (``echokv-mix`` while the default is the mix) is
    left out."""
    seen, out = [], []
    for name, (cls, defaults) in REGISTRY.items():
        same = (cls, {k: v for k, v in defaults.items() if k != "name"})
        if same in seen or (name.startswith("kvpress:") and not kvpress_available()):
            continue
        seen.append(same)
        out.append(name)
    return out


def parse_methods(spec: str) -> list[str]:
    """'full,echokv,...' or 'all' -> method names; unknown names raise listing the known ones."""
    from echokv.util import parse_csv

    names = parse_csv(spec, what="method")
    if names == ["all"]:
        return available_methods()
    known = known_methods()
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; known methods: {', '.join(known)}, or 'all'")
    if not names:
        raise ValueError("no method given; known methods: " + ", ".join(known))
    return names


def make_method(name: str, ratio: float, artifacts: list[str] | None = None, **kwargs) -> Method:
    """The method ``name`` at compression ``ratio``; EchoKV (and headdrop) pick their artifact among
    ``artifacts``."""
    check_ratio(ratio)
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
    cls, defaults = REGISTRY[name]
    return cls.create(ratio, artifacts, **defaults, **kwargs)
