"""A model echokv loads (the embedded GGUF by default) as a plain safetensors folder that a serving engine loads.

    python -m echokv.serving.export OUT [--model smollm2-135m] [--dtype float32]
    python -m echokv.serving.export OUT --echokv-q 0.5     # EchoKV-Q's codec for the engine, fitted here

transformers 5 keeps GGUF weights packed and will not save them: the model is loaded dequantized (as echokv always
loads it), its weights are copied into a plain model of the same config, and that is saved. The folder is also
made readable by transformers 4.x (vLLM 0.16 pins transformers<5): 4.x reads ``rope_theta``, not
``rope_parameters`` (without it, it would silently use 10000), and knows no ``TokenizersBackend`` class.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..models import DEFAULT_MODEL, load_model, resolve_dtype
from ..util import atomic_dir, is_own_file


def _for_transformers4(folder: Path) -> None:
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"RoPE type {rope['rope_type']!r} is not exported for transformers 4 (default only)")
        config["rope_theta"] = rope["rope_theta"]
        config["rope_scaling"] = None
    config_file.write_text(json.dumps(config, indent=2))
    tok_file = folder / "tokenizer_config.json"
    tok = json.loads(tok_file.read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok.pop("backend", None)
    template = folder / "chat_template.jinja"
    if template.is_file() and "chat_template" not in tok:
        tok["chat_template"] = template.read_text()
    tok_file.write_text(json.dumps(tok, indent=2))


def export(out, model: str = DEFAULT_MODEL, dtype: str = "float32") -> Path:
    """Write ``model`` in ``dtype`` to the new folder ``out`` (refused if it exists); returns ``out``."""
    from transformers import AutoModelForCausalLM

    out = Path(out).expanduser()
    source = Path(str(model)).expanduser()
    if is_own_file(source / "config.json"):  # load_model's own advice (--artifact) names flags export has not
        raise ValueError(f"{source} is an echokv artifact, not a model: export the model it was trained for "
                         "(--model); the engine takes the artifact as echokv_artifact in --hf-overrides")
    with atomic_dir(out, flag=None) as tmp:  # checks ``out`` before the model is loaded (export never replaces)
        loaded, tokenizer = load_model(model, dtype=dtype)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
        plain.load_state_dict(loaded.state_dict(), strict=True)
        plain.tie_weights()
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _for_transformers4(tmp)
    return out


def export_codec(out, compression_ratio: float, model: str = DEFAULT_MODEL) -> Path:
    """Fit EchoKV-Q on the calibration text for ``model`` and write it to the new folder ``out`` (what an engine
    serving that model takes as ``echokv_artifact``). The ratio is of a 16-bit cache whatever the engine's dtype, as
    the mix artifacts' rows are (fitted in float32, the allocator would otherwise aim at twice the bytes)."""
    from ..codecs.headq import fit_calibrated, save
    from ..util import check_output_dir

    if not 0 < compression_ratio < 1:
        raise ValueError(f"--echokv-q must be between 0 and 1 (the fraction of the cache removed), got "
                         f"{compression_ratio}")
    out = Path(out).expanduser()
    check_output_dir(out, False, True, flag=None)  # before the model is loaded
    loaded, tokenizer = load_model(model, dtype="float32")
    codec = fit_calibrated(loaded, tokenizer, compression_ratio, progress=True, element_bytes=2)
    return save(codec, out, loaded, compression_ratio)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echokv.serving.export", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="a new folder")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32", help="float32 (serve it with --dtype float32) or bfloat16")
    parser.add_argument("--echokv-q", type=float, default=None, metavar="RATIO",
                        help="write EchoKV-Q's codec at this compression ratio (fitted on the calibration text) "
                             "instead of the model")
    args = parser.parse_args(argv)
    try:
        if args.echokv_q is not None:
            print(export_codec(args.out, args.echokv_q, args.model))
        else:
            print(export(args.out, args.model, args.dtype))
    except (OSError, ValueError) as exc:
        print(f"echokv export: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
