# Emulates matvec_tc.cu's MtQ6K on one random Q6_K row: its loads (aligned words
# realigned by funnel shifts), fields, x slots, staged offsets and fold, against ggml's
# dequantization. Prints the reference dot, the emulated one and their relative difference (f16
# x: ~1e-5; with f32 x, edit the staged line: ~1e-15). Needs numpy.
import numpy as np
rng = np.random.default_rng(3)
k = 2048; nb = k // 256
row = bytearray()
for b in range(nb):
    blk = bytearray(rng.integers(0, 256, 208, dtype=np.uint8).tobytes())
    blk += np.array([rng.uniform(0.001, 0.01)], dtype=np.float16).tobytes()
    row += blk
row = bytes(16) + row + bytes(16)  # the row at byte 16 of an aligned buffer
base = 16
def q6(ql, qh, e):
    half, r = e // 128, e % 128; g, l = r // 32, r % 32
    low = (ql[half * 64 + (g % 2) * 32 + l] >> (4 * (g // 2))) & 0xF
    high = (qh[half * 32 + l] >> (2 * g)) & 3
    return low | (high << 4)
def deq(b):
    ql, qh, sc = b[:128], b[128:192], b[192:208]
    d = float(np.frombuffer(b[208:210], np.float16)[0])
    return np.array([d * (sc[e // 16] - 256 if sc[e // 16] >= 128 else sc[e // 16]) * (q6(ql, qh, e) - 32) for e in range(256)])
w = np.concatenate([deq(row[base + 210 * b: base + 210 * b + 210]) for b in range(nb)])
x = rng.normal(size=k); want = w @ x
M = 0xffffffff
def u32(a): return int.from_bytes(row[a:a + 4], 'little')
def fsr(lo, hi, s): return ((hi << 32 | lo) >> s) & M   # __funnelshift_r
def load8(a):  # 8 bytes at a 2-byte aligned address: three aligned words, realigned
    a0 = a & ~3; s = 8 * (a & 3)
    w0, w1, w2 = u32(a0), u32(a0 + 4), u32(a0 + 8)
    return fsr(w0, w1, s), fsr(w1, w2, s)
def f16(v): return float(np.frombuffer(np.uint16(v).tobytes(), np.float16)[0])
def pair(ql, qh, g, odd):   # fields (e0, e2) of a word pair (odd: (e1, e3))
    if odd: ql, qh = ql >> 8, qh >> 8
    if g < 2:
        h = (qh << 4) if g == 0 else (qh << 2)
        v = (ql & 0x000f000f) | (h & 0x00300030) | 0x64006400
    else:
        h = (qh << 4) if g == 2 else (qh << 2)
        v = (ql & 0x00f000f0) | (h & 0x03000300) | 0x54005400
    v &= M
    return f16(v & 0xffff), f16(v >> 16)
def slot(j, e): return 8 * j + [0, 2, 1, 3, 4, 6, 5, 7][e]
acc = 0.0
chunks = k // 32
for c in range(chunks):
    b, cc = c >> 3, c & 7; h, t = cc >> 2, cc & 3; l0 = 8 * t
    B = base + 210 * b
    A = load8(B + 64 * h + l0); Bq = load8(B + 64 * h + 32 + l0); H = load8(B + 128 + 32 * h + l0)
    S = load8(B + 192 + 8 * h)
    d = f16(u32((B + 208) & ~3) >> (8 * ((B + 208) & 3)) & 0xffff)
    xs = lambda g: x[256 * b + 128 * h + 32 * g + l0: 256 * b + 128 * h + 32 * g + l0 + 8]
    v = np.concatenate([xs(g) for g in range(4)])
    staged = [np.float16(v[slot(j, e)]) for j in range(4) for e in range(8)]
    off = [(1056 if j < 2 else 96) * sum(float(staged[8 * j + e]) for e in range(8)) for j in range(4)]
    for j in range(4):  # run g = j
        ql = A if j % 2 == 0 else Bq
        p = [pair(ql[0], H[0], j, False), pair(ql[0], H[0], j, True), pair(ql[1], H[1], j, False), pair(ql[1], H[1], j, True)]
        dot = sum(p[q][hh] * float(staged[8 * j + 2 * q + hh]) for q in range(4) for hh in range(2))
        sb = (S[j >> 1] >> (8 * (2 * (j & 1) + (t >> 1)))) & 0xff
        sc = sb - 256 if sb >= 128 else sb
        acc += d * sc * (dot - off[j])
print(want, acc, abs(want - acc) / np.abs(w).dot(np.abs(x)))
