"""The loops of one kernel's SASS (`cuobjdump -sass`, one function): for each backward branch,
the address range it closes, its instruction count and the opcodes by count. Used by
sass_loops.sh; runs anywhere on a saved listing: python3 scripts/sass_loops.py kernel.sass"""

import collections
import re
import sys

LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def instructions(path):
    """(address, opcode, text) of every instruction in the listing."""
    out = []
    for text in open(path):
        m = LINE.search(text)
        if m:
            out.append((int(m.group(1), 16), m.group(2), text))
    return out


def loops(code):
    """(start, end, opcode counts) of each range a backward branch closes."""
    found = []
    for address, opcode, text in code:
        m = BRANCH.search(text) if opcode == "BRA" else None
        if m and int(m.group(1), 16) < address:
            start = int(m.group(1), 16)
            body = collections.Counter(op for a, op, _ in code if start <= a <= address)
            found.append((start, address, body))
    return found


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: sass_loops.py KERNEL.sass")
    code = instructions(sys.argv[1])
    if not code:
        sys.exit(f"{sys.argv[1]}: no SASS instructions (is the kernel name right?)")
    for start, end, body in loops(code):
        ops = ", ".join(f"{op} {n}" for op, n in body.most_common())
        print(f"loop {start:#06x}..{end:#06x}: {sum(body.values())} instructions: {ops}")


if __name__ == "__main__":
    main()
