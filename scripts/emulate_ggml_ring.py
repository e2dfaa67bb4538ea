# Emulates matmul_tc.cu's matmul_tcq_{q4_0,q4_1,q5_0,q5_1,q8_0} (TcqGgml) on random rows: the
# step's 4-byte word copies (two blocks of a row), each thread's words by its constants (base,
# next, sh, dword, dhalf, qh_*), its fields with the fifth bits, d and m, and the staged x order
# (tcq_column, TCQ_Q4_0 and TCQ_BYTES), against ggml's dequantization. Prints, for each format
# and row, the reference dot, the emulated one and their relative difference (~1e-16 in f64;
# the kernel rounds x and the weights to f16). Needs numpy.
import numpy as np
rng = np.random.default_rng(12)
k = 320  # five steps of two blocks

# (block bytes, where the quants start, where qh starts or None, has a minimum, 8-bit)
FORMATS = {
    "q4_0": (18, 2, None, False, False),
    "q4_1": (20, 4, None, True, False),
    "q5_0": (22, 6, 2, False, False),
    "q5_1": (24, 8, 4, True, False),
    "q8_0": (34, 2, None, False, True),
}


def f16(bits):
    return float(np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0])


def f16_bits(v):
    return int(np.array([v], dtype=np.float16).view(np.uint16)[0])


def random_row(fmt):
    block, qs, qh, affine, _ = FORMATS[fmt]
    row = b""
    for _ in range(k // 32):
        head = f16_bits(rng.uniform(0.001, 0.01)).to_bytes(2, "little")
        if affine:
            head += f16_bits(rng.uniform(-0.05, 0.05)).to_bytes(2, "little")
        rest = rng.integers(0, 256, block - len(head), dtype=np.uint8).tobytes()
        row += head + rest
    return row


def reference(fmt, row, x):  # ggml's dequantize_row_*
    block, qs, qh, affine, bytes8 = FORMATS[fmt]
    w = []
    for b in range(k // 32):
        blk = row[block * b:block * (b + 1)]
        d = f16(int.from_bytes(blk[0:2], "little"))
        m = f16(int.from_bytes(blk[2:4], "little")) if affine else 0.0
        if bytes8:
            w += [d * int(v) for v in np.frombuffer(blk[2:34], dtype=np.int8)]
            continue
        h = int.from_bytes(blk[qh:qh + 4], "little") if qh is not None else 0
        q = [0] * 32
        for i in range(16):
            q[i] = (blk[qs + i] & 15) | (((h >> i) & 1) << 4)
            q[i + 16] = (blk[qs + i] >> 4) | (((h >> (i + 16)) & 1) << 4)
        off = 0 if affine else (16 if qh is not None else 8)
        w += [d * (v - off) + m for v in q]
    return float(np.dot(w, x))


def tcq_column(p, bytes8):  # TCQ_BYTES, TCQ_Q4_0
    c, t, j, h = p >> 4, (p >> 1) & 3, p & 1, (p >> 3) & 1
    if bytes8:
        return 16 * t + 4 * c + 2 * j + h
    return 32 * (t >> 1) + 8 * (t & 1) + 4 * (c >> 1) + (c & 1) + 2 * j + 16 * h


def funnel(lo, hi, sh):  # __funnelshift_r
    return ((hi << 32 | lo) >> sh) & 0xFFFFFFFF


def constants(fmt, t):  # TcqGgml's constructor
    block, qs, qh, affine, bytes8 = FORMATS[fmt]
    per = 4 if bytes8 else 2
    sh0, sh1 = 8 * (qs % 4), 8 * ((block + qs) % 4)
    blk = t >> 1
    c = {
        "base": qs // 4 + per * t + blk * ((block + qs) // 4 - qs // 4 - 2 * per),
        "next": (1 if sh0 else 0) + blk * ((1 if sh1 else 0) - (1 if sh0 else 0)),
        "sh": sh1 if blk else sh0,
        "dhalf": 8 * (block % 4) * blk,
        "dword": block // 4 if blk else 0,
    }
    if qh is not None:
        c["qh_base"] = (block + qh) // 4 if blk else qh // 4
        c["qh_sh"] = 8 * ((block + qh) % 4) if blk else 8 * (qh % 4)
        c["qh_next"] = 1 if c["qh_sh"] else 0
        c["qh_bit"] = 8 * (t & 1)
    return c


def kernel(fmt, row, x):
    block, qs, qh, affine, bytes8 = FORMATS[fmt]
    words_n = 2 * block // 4
    lo_off, hi_off = {"q4_0": (1032, 72), "q5_0": (1040, 80)}.get(fmt, (1024, 64))
    total = 0.0
    for step in range(k // 64):
        k0 = step * 64
        r = [int.from_bytes(row[2 * block * step + 4 * i:2 * block * step + 4 * i + 4], "little")
             for i in range(words_n)]  # TcqGgml::load
        staged = [x[k0 + tcq_column(p, bytes8)] for p in range(64)]  # stage_x_f16
        for t in range(4):
            cs = constants(fmt, t)
            d = f16(r[cs["dword"]] >> cs["dhalf"])
            m = f16(r[cs["dword"]] >> 16) if affine else 0.0
            for c in range(4):
                if bytes8:
                    a = cs["base"] + c
                    v = funnel(r[a], r[a + cs["next"]], cs["sh"]) ^ 0x80808080
                    fields = [[((v >> (8 * e)) & 255) - 128 for e in (0, 2)],
                              [((v >> (8 * e)) & 255) - 128 for e in (1, 3)]]
                else:
                    a = cs["base"]
                    words = [funnel(r[a], r[a + 1], cs["sh"]),
                             funnel(r[a + 1], r[a + 1 + cs["next"]], cs["sh"])]
                    v = words[c >> 1] >> (8 * (c & 1))
                    lo = (v & 0x000F000F) | 0x64006400
                    hi = (v & 0x00F000F0) | 0x64006400
                    if qh is not None:
                        hq = funnel(r[cs["qh_base"]], r[cs["qh_base"] + cs["qh_next"]],
                                    cs["qh_sh"])
                        h = hq >> (cs["qh_bit"] + 4 * (c >> 1) + (c & 1))
                        lo |= ((h & 1) << 4) | ((h & 4) << 18)
                        hi |= ((h & 0x10000) >> 8) | ((h & 0x40000) << 6)
                    fields = [[f16(lo >> (16 * e)) - lo_off for e in (0, 1)],
                              [f16(hi >> (16 * e)) / 16 - hi_off for e in (0, 1)]]
                for hh in range(2):
                    for jj in range(2):
                        total += (fields[hh][jj] * d + m) * staged[16 * c + 8 * hh + 2 * t + jj]
    return total


for fmt in FORMATS:
    for _ in range(3):
        row = random_row(fmt)
        x = rng.standard_normal(k)
        ref, emu = reference(fmt, row, x), kernel(fmt, row, x)
        print(fmt, ref, emu, abs(ref - emu) / abs(ref))
        assert abs(ref - emu) <= 1e-9 * abs(ref), f"{fmt}: the emulated kernel differs from ggml"
