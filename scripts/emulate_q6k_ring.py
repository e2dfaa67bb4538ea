# Emulates matmul_tc.cu's matmul_tcq_q6_k on random Q6_K rows: the step copies (8-byte words
# from aligned addresses around a half's ql, its qh, and the scales with d), each thread's
# realigned words, fields, scales and the staged x order (tcq_column, TCQ_Q4K), against ggml's
# dequantization. Prints, for each row, the reference dot, the emulated one and their relative
# difference (~1e-16 in f64; the kernel rounds x and the weights to f16). Needs numpy.
import numpy as np
rng = np.random.default_rng(11)
k = 2048  # rows 16-byte aligned (k % 2,048 == 0): a row is 8·210 bytes per 2,048
BLOCK = 210


def random_row():
    row = bytearray()
    for _ in range(k // 256):
        blk = bytearray(rng.integers(0, 256, 208, dtype=np.uint8).tobytes())
        blk += bytearray(np.array([rng.uniform(0.001, 0.01)], dtype=np.float16).tobytes())
        row += blk
    return bytes(row)


def f16(bits):
    return float(np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0])


def reference(row, x):  # ggml's dequantize_row_q6_K
    w = []
    for s in range(k // 256):
        b = row[BLOCK * s:BLOCK * s + BLOCK]
        ql, qh, sc = b[0:128], b[128:192], np.frombuffer(b[192:208], dtype=np.int8)
        d = f16(int.from_bytes(b[208:210], "little"))
        out = [0.0] * 256
        for h in range(2):
            for l in range(32):
                for g in range(4):
                    low = (ql[64 * h + 32 * (g & 1) + l] >> (4 * (g >> 1))) & 15
                    high = (qh[32 * h + l] >> (2 * g)) & 3
                    e = 128 * h + 32 * g + l
                    out[e] = d * int(sc[e // 16]) * ((low | (high << 4)) - 32)
        w += out
    return float(np.dot(w, x))


def tcq_column(p):  # TCQ_Q4K
    c, t, j, h = p >> 4, (p >> 1) & 3, p & 1, (p >> 3) & 1
    return 8 * t + 4 * (c >> 1) + (c & 1) + 2 * j + 32 * h


def funnel(lo, hi, sh):  # __funnelshift_r
    return ((hi << 32 | lo) >> sh) & 0xFFFFFFFF


def kernel(memory, base, x):
    total = 0.0
    for step in range(k // 64):
        k0 = step * 64
        sb, s = k0 // 256, step & 3
        half, par = s >> 1, s & 1
        blk = base + BLOCK * sb
        # TcqQ6K::load: 9 words around the half's ql, 5 around its qh, 3 around scales and d.
        smem = b""
        for start, n8 in ((blk + 64 * half, 9), (blk + 128 + 32 * half, 5), (blk + 192, 3)):
            a = start & ~7
            # Every word holds a byte of the super-block (the last one may reach 6 bytes past
            # it, inside the aligned 8 bytes that hold the tensor's last bytes).
            assert a + 8 * (n8 - 1) < blk + BLOCK, "a word past the super-block"
            smem += memory[a:a + 8 * n8]
        words = [int.from_bytes(smem[4 * i:4 * i + 4], "little") for i in range(34)]
        mis = blk & 7  # where the super-block starts in each region (alike for all rows)
        sh = 8 * (mis & 3)

        def at(byte):  # the 4 bytes at smem offset `byte` (2-byte aligned)
            return funnel(words[byte >> 2], words[(byte >> 2) + 1], sh)

        # prepare: the step's 4 scales and d
        scales = at(112 + mis + 8 * half + 4 * par)
        d = f16(int.from_bytes(smem[112 + mis + 16:112 + mis + 18], "little"))  # a 2-byte load
        staged = [x[k0 + tcq_column(q)] for q in range(64)]  # stage_x_f16
        for t in range(4):
            ql_lo = [at(mis + 8 * t), at(mis + 8 * t + 4)]
            ql_hi = [at(mis + 32 + 8 * t), at(mis + 32 + 8 * t + 4)]
            qh = [at(72 + mis + 8 * t), at(72 + mis + 8 * t + 4)]
            dsc = []
            for hh in range(2):
                byte = (scales >> (8 * (2 * hh + (t >> 1)))) & 0xFF
                sc = byte - 256 if byte > 127 else byte
                dsc.append(d * sc)  # the kernel rounds it to f16
            for c in range(4):
                vq = (qh[c >> 1] >> (8 * (c & 1))) >> (4 * par)
                for hh in range(2):
                    v = ((ql_hi if hh else ql_lo)[c >> 1] >> (8 * (c & 1))) >> (4 * par)
                    field = (v & 0x000F000F) | 0x64006400 | (((vq >> (2 * hh)) & 0x00030003) << 4)
                    for jj in range(2):
                        q = f16(field >> (16 * jj)) - 1056  # q − 32
                        total += q * dsc[hh] * staged[16 * c + 8 * hh + 2 * t + jj]
    return total


memory = bytearray(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())  # rows from offset 64
rows = [random_row() for _ in range(3)]
for r in rows:
    memory += r
memory = bytes(memory + bytes(8))
for i, r in enumerate(rows):
    x = rng.standard_normal(k)
    ref = reference(r, x)
    emu = kernel(memory, 64 + len(r) * i, x)
    print(ref, emu, abs(ref - emu) / abs(ref))
    assert abs(ref - emu) <= 1e-6 * abs(ref), "the emulated kernel differs from ggml"
