"""`bench.py` with the K tiles of some launch shapes loaded as [head dims, keys] rather than
[keys, head dims] (`configs.loads_keys_as_rows` answering False for them); every other choice as
the table makes it. A probe for one question (does the spec-verify K layout hold q8 back?),
not a benchmark mode: the rows it writes do not record the layout, so label them.

    KEYS_AS_COLUMNS=spec_split_tall,spec_tall python3 benchmarks/prototypes/keys_layout_probe.py \\
        kernels --cudagraph --providers portable --cases spec_q8_b8_ctx8k --out rows.jsonl

H200, session K (rows `results/h200-k-spec-key-layout-fdda3ec-2026-11-30.jsonl`): no gain.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vllm_portable_attn.kernels import configs  # noqa: E402

_AS_COLUMNS = set(filter(None, os.environ.get("KEYS_AS_COLUMNS", "").split(",")))
_table_layout = configs.loads_keys_as_rows


def _layout(shape: str, arch: str) -> bool:
    return shape not in _AS_COLUMNS and _table_layout(shape, arch)


configs.loads_keys_as_rows = _layout
import bench  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench.main())
