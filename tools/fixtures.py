"""Real-size ReLU fixture: SmolLM2's weights with ReLU in place of SiLU, as a GGUF copy on disk.

Its text is meaningless but its sparsity is exact (a ReLU FFN's inactive neurons contribute nothing), so it is
the model to measure ReLU predictors on without downloading a ReLU LLM. `write_relu_gguf(PATH)` copies the default
model's GGUF key by key and tensor by tensor (quantized blocks copied raw, so the FFN weights hash the same) and sets
`hotcold.ffn_act = relu`; then `-m PATH` on the command line. Only GGUFReader/GGUFWriter are used, never
hand-written GGUF.
"""
from __future__ import annotations

from engine.config import KEY_ACT, KEY_ACT_THRESHOLD
from engine.loader import open_gguf, resolve


def write_relu_gguf(path: str) -> str:
    """Copy the default model's GGUF to `path` with `hotcold.ffn_act` = relu. Returns path."""
    from gguf import GGUFWriter

    from tools.export import copy_key
    r = open_gguf(resolve(None))
    wr = GGUFWriter(path, str(r.fields["general.architecture"].contents()))
    for key, f in r.fields.items():
        if not key.startswith("GGUF.") and key not in ("general.architecture", KEY_ACT, KEY_ACT_THRESHOLD):
            copy_key(wr, key, f)
    wr.add_string(KEY_ACT, "relu")
    wr.add_float32(KEY_ACT_THRESHOLD, 0.0)
    for t in r.tensors:
        wr.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path
