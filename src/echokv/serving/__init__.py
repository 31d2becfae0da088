"""echokv in a serving engine (docs/serving.md).

* :mod:`echokv.serving.rows`: a mix artifact's stored representation of K/V as rows of bytes, one per token and
  group of layers; the serde of offloaded K/V (:class:`~echokv.serving.rows.KVSerde`). Pure torch.
* :mod:`echokv.serving.pages` / :mod:`echokv.serving.offload`: EchoKV-Q's codes in an engine's pages; a full
  engine's K/V stored as those codes and restored. Pure torch.
* :mod:`echokv.serving.export`: the embedded model as a safetensors folder a serving engine can load.
* :mod:`echokv.serving.check`: what an engine refuses at start-up (an artifact for another model, ...).
* :mod:`echokv.serving.vllm`: the vLLM plugin (only importable where vLLM is installed: ``.venv-serve``).
* :mod:`echokv.serving.server`: start, query and stop a local vLLM server (tests, measurements).

Nothing here is imported by the rest of echokv.
"""
