"""Timing aid (the output is not a usable model): copy an arb-rc --cgb .stb with its row-col-sign tensors reduced to
their first scale group (the group plane, the group1_* scales and the groups param dropped), so that
`stbllm-bench IN --vs OUT` measures what the groups cost the runtime: the second pass of the sign kernels, and in a
dense file the keep-masks that make each group's pass a masked one.
usage: python benchmarks/strip_rowcol_groups.py IN.stb OUT.stb"""
import sys

import numpy as np
from stbllm_rt import StbReader, StbWriter

src, dst = sys.argv[1:]
r = StbReader(src)
w = StbWriter(r.metadata)
w._features = r.required_features
for name in r.tensor_names():
    info = r.tensor_info(name)
    params = dict(info["params"]) if info.get("params") else None
    keys = [k for k in info["components"] if not (info["codec"] == "stb.row-col-sign.v1" and k.startswith("group"))]
    if params and info["codec"] == "stb.row-col-sign.v1":
        params.pop("groups", None)
    comps = {k: np.array(r.component(name, k)) for k in keys}
    w._add(name, info["codec"], info["shape"], params, comps, 0)
w.write(dst)
