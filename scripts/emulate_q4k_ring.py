# Emulates matmul_tc.cu's matmul_tcq_q4_k and matmul_tcq_q5_k on one random Q4_K / Q5_K row:
# the step copies (header, a sub-block pair's nibbles, Q5_K's qh), each thread's fragment fields,
# scale decoding and the staged x order (tcq_column, TCQ_Q4K), against ggml's dequantization.
# Prints, for each, the reference dot, the emulated one and their relative difference (~1e-16 in
# f64; the kernel rounds x and the weights to f16). Needs numpy.
import sys
import numpy as np
BITS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
BLOCK, QS = (144, 16) if BITS == 4 else (176, 48)
rng = np.random.default_rng(7)
k = 1024
row = bytearray()
for _ in range(k // 256):
    blk = bytearray(np.array(rng.uniform(0.001, 0.01, 2), dtype=np.float16).tobytes())
    blk += bytearray(rng.integers(0, 256, BLOCK - 4, dtype=np.uint8).tobytes())
    row += blk
row = bytes(row)
x = rng.standard_normal(k)

def f16(b, at):
    return float(np.frombuffer(b[at:at + 2], dtype=np.float16)[0])

def scale_min(sc, j):  # ggml's get_scale_min_k4
    if j < 4:
        return sc[j] & 63, sc[j + 4] & 63
    return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

def reference():
    w = []
    for s in range(k // 256):
        b = row[BLOCK * s:BLOCK * s + BLOCK]
        d, dmin = f16(b, 0), f16(b, 2)
        qh = b[16:48] if BITS == 5 else bytes(32)
        for p in range(4):
            qs = b[QS + 32 * p:QS + 32 + 32 * p]
            s1, m1 = scale_min(b[4:16], 2 * p)
            s2, m2 = scale_min(b[4:16], 2 * p + 1)
            w += [d * s1 * ((q & 15) + 16 * ((qh[l] >> (2 * p)) & 1)) - dmin * m1 for l, q in enumerate(qs)]
            w += [d * s2 * ((q >> 4) + 16 * ((qh[l] >> (2 * p + 1)) & 1)) - dmin * m2 for l, q in enumerate(qs)]
    return float(np.dot(w, x))

def tcq_column(p):  # TCQ_Q4K
    c, t, j, h = p >> 4, (p >> 1) & 3, p & 1, (p >> 3) & 1
    return 8 * t + 4 * (c >> 1) + (c & 1) + 2 * j + 32 * h

def kernel():
    total = 0.0
    for step in range(k // 64):
        k0 = step * 64
        blk = row[BLOCK * (k0 // 256):BLOCK * (k0 // 256) + BLOCK]
        smem = blk[0:16] + blk[QS + 32 * (step & 3):QS + 32 + 32 * (step & 3)]  # TcqK::load
        if BITS == 5:
            smem += blk[16:48]
        words = [int.from_bytes(smem[4 * i:4 * i + 4], "little") for i in range(len(smem) // 4)]
        h = words[0:4]
        p = step & 3
        if p < 2:
            sc, mn = (h[1] >> (16 * p)) & 0x3F3F, (h[2] >> (16 * p)) & 0x3F3F
        else:
            sh = 16 * (p - 2)
            b1, b2, b3 = h[1] >> sh, h[2] >> sh, h[3] >> sh
            sc = (b3 & 0x0F0F) | ((b1 >> 2) & 0x3030)
            mn = ((b3 >> 4) & 0x0F0F) | ((b2 >> 2) & 0x3030)
        d = float(np.array([h[0] & 0xFFFF], dtype=np.uint16).view(np.float16)[0])
        dmin = float(np.array([h[0] >> 16], dtype=np.uint16).view(np.float16)[0])
        ds = [d * ((sc >> (8 * s)) & 0xFF) for s in range(2)]
        dm = [-dmin * ((mn >> (8 * s)) & 0xFF) for s in range(2)]
        staged = [x[k0 + tcq_column(q)] for q in range(64)]  # stage_x_f16
        for t in range(4):
            tw = [words[4 + 2 * t], words[5 + 2 * t]]
            fifth = [words[12 + 2 * t] >> (2 * p), words[13 + 2 * t] >> (2 * p)] if BITS == 5 else [0, 0]
            for c in range(4):
                v = (tw[c >> 1] >> (8 * (c & 1))) & 0xFFFFFFFF
                f = fifth[c >> 1] >> (8 * (c & 1))
                lo = (v & 0x000F000F) | 0x64006400  # 1024 + q
                hi = (v & 0x00F000F0) | 0x64006400  # 1024 + 16q
                if BITS == 5:
                    lo |= (f << 4) & 0x00100010
                    hi |= (f << 7) & 0x01000100
                for hh in range(2):  # b[0]: low nibbles, b[1]: high
                    for jj in range(2):  # the pair's halves: bytes 0 and 2 of v
                        half = ((hi if hh else lo) >> (16 * jj)) & 0xFFFF
                        field = float(np.array([half], dtype=np.uint16).view(np.float16)[0])
                        q = field / 16 - 64 if hh else field - 1024
                        w = q * ds[hh] + dm[hh]
                        total += w * staged[16 * c + 8 * hh + 2 * t + jj]
    return total

ref, emu = reference(), kernel()
print(ref, emu, abs(ref - emu) / abs(ref))
