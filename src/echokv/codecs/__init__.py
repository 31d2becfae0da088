"""Codecs: what compressed tokens become (:class:`~echokv.cache.codec.KVCodec`), one file each.

A codec is a storage format: it encodes a group of layers' K/V into stored tensors and decodes a layer back.
How a codec's parameters are fitted, and how a method is run and reported, is the method's business
(:mod:`echokv_lab.methods`). A new codec is one file here plus the method that makes it, registered there.

* :mod:`~echokv.codecs.mix`: EchoKV's stored components (learned mixes or retained heads, pre-RoPE keys, each
  component at its precision), with its fast attention;
* :mod:`~echokv.codecs.headdrop`: retained heads, the others a constant per head;
* :mod:`~echokv.codecs.projection`: low-rank latents of fixed bases (lowrank, xlayer-svd);
* :mod:`~echokv.codecs.quant`: group-wise integer codes.
"""

