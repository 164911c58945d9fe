"""Reading optimized HLO text: which data-moving instructions touch large buffers."""

from __future__ import annotations

import re

import numpy as np

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\][^ ]*\s+([\w\-]+)\((.*)$")
MOVES = ("copy", "transpose", "convert", "slice", "dynamic-slice", "concatenate", "pad")


def large_moves(hlo_text: str, min_elements: int, opcodes=MOVES) -> list[str]:
    """Instructions with an opcode in ``opcodes`` (also inside fusions) that move at least
    ``min_elements`` elements: by their result, or (copy / transpose / convert, which move all
    of it) by an operand. Reading one row out of a large buffer (a small slice) is no copy."""
    sizes, found = {}, []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, _, dims, opcode, rest = m.groups()
        n = int(np.prod([int(x) for x in dims.split(",") if x])) if dims else 1
        sizes[name] = n
        if opcode.startswith("copy") or opcode in opcodes:
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            whole = opcode.startswith("copy") or opcode in ("transpose", "convert")
            if max([n] + [sizes.get(o, 0) for o in operands if whole]) >= min_elements:
                found.append(line.strip()[:200])
    return found
