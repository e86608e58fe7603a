"""Real-size ReLU fixture: SmolLM2's weights with ReLU in place of SiLU, in memory or as a GGUF copy on disk.

Its text is meaningless but its sparsity is exact (a ReLU FFN's inactive neurons contribute nothing), so it is
the model to measure ReLU predictors on without downloading a ReLU LLM. In memory:

    model = smollm2_relu_model(n_ctx=512)                   # engine.api.Model, act "relu"

On disk, for the CLI (`-m PATH`): `write_relu_gguf(PATH)` copies the default model's GGUF key by key and tensor
by tensor (quantized blocks copied raw, so the FFN weights hash the same as in memory) and sets
`hotcold.ffn_act = relu`. Only GGUFReader/GGUFWriter are used, never hand-written GGUF.
"""
from __future__ import annotations

import dataclasses

from engine.config import KEY_ACT, KEY_ACT_THRESHOLD
from engine.loader import load_checkpoint, resolve


def smollm2_relu_checkpoint(model: str | None = None):
    """The checkpoint of `model` (default SmolLM2-135M) with its FFN activation replaced by ReLU."""
    ckpt = load_checkpoint(model)
    return dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, act="relu", act_threshold=0.0))


def smollm2_relu_model(n_ctx: int = 512, backend: str = "torch", model: str | None = None):
    """engine.api.Model of the ReLU twin (torch backend by default: the path the FFN hooks see)."""
    from engine.api import Model
    return Model(smollm2_relu_checkpoint(model), n_ctx, backend=backend)


def write_relu_gguf(path: str, model: str | None = None, act: str = "relu") -> str:
    """Copy the GGUF of `model` (default SmolLM2) to `path` with `hotcold.ffn_act` = act. Returns path."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    src = resolve(model)
    r = GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    wr = GGUFWriter(path, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", KEY_ACT, KEY_ACT_THRESHOLD):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        wr.add_key_value(key, f.contents(), vtype, sub)
    wr.add_string(KEY_ACT, act)
    wr.add_float32(KEY_ACT_THRESHOLD, 0.0)
    for t in r.tensors:
        wr.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path
