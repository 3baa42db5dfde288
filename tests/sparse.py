"""Write safetensors files whose data is a hole: the header of a multi-GB checkpoint in a few kB.

Size detection reads only the header and the file length, so a sparse file with the real shapes
of a big or lite checkpoint tests it without writing gigabytes.
"""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path

_BYTES = {"BF16": 2, "F32": 4}


def write_sparse_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16") -> Path:
    header, offset = {}, 0
    for key, shape in sorted(shapes.items()):
        nbytes = prod(shape) * _BYTES[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        f.truncate(8 + len(encoded) + offset)
    return path
