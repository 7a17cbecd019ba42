"""Emulation of the CUDA causal conv with boundaries (model/conv1d_cuda.cu) in float64.

The kernels cannot run without a GPU, so their indexing is checked here: every thread of a
grid-stride launch is one element of a numpy vector (e -> (b, t, i) as in the kernels), the dw/dbias
kernel runs block by block (32 channels x 8 row lanes over rows_per rows, partial rows summed as
the caller sums them), global memory is flat arrays whose reads are bounds-checked where the
kernel's predicate lets them happen, and every output element must be written exactly once. The
results must equal a float64 autograd reference of the masked conv (causal_conv1d_ref's math) to
1e-12. Races and float32 rounding are for the GPU tests (ConvCuda.*).
"""
import numpy as np
import pytest
import torch

K_THREADS, K_CHANNELS = 256, 32
K_ROW_LANES = K_THREADS // K_CHANNELS
K_MAX_TAPS = 8
K_MAX_PARTIAL_ROWS = 64


class Mem:
    def __init__(self, name, a):
        self.name, self.a = name, np.asarray(a, dtype=np.float64).reshape(-1).copy()
        self.writes = np.zeros(self.a.size, dtype=np.int64)

    def read(self, idx, mask=True):
        idx = np.asarray(idx, dtype=np.int64)
        mask = np.broadcast_to(np.asarray(mask, dtype=bool), idx.shape)
        bad = mask & ((idx < 0) | (idx >= self.a.size))
        assert not bad.any(), f"{self.name}: index {idx[bad][:4]} outside [0, {self.a.size})"
        if self.a.size == 0:  # (an empty buffer, none of whose elements the predicate lets be read)
            return np.zeros(idx.shape)
        return np.where(mask, self.a[np.where(mask, idx, 0)], 0.0)

    def write(self, idx, val, mask=True):
        idx = np.asarray(idx, dtype=np.int64)
        mask = np.broadcast_to(np.asarray(mask, dtype=bool), idx.shape)
        assert not (mask & ((idx < 0) | (idx >= self.a.size))).any(), f"{self.name}: write outside"
        sel = idx[mask]
        assert np.unique(sel).size == sel.size, f"{self.name}: two threads write one address"
        self.a[sel] = np.broadcast_to(val, idx.shape)[mask]
        np.add.at(self.writes, sel, 1)


def same_document(seq, b, L, s, t, mask):
    """same_document(seq + b * L, s, t): s < 0 reads position 0."""
    if seq is None:
        return np.ones(np.shape(t), dtype=bool)
    return seq.read(b * L + np.where(s < 0, 0, s), mask) == seq.read(b * L + t, mask)


def partial_rows(B, L):
    return max(1, min(K_MAX_PARTIAL_ROWS, (B * L + 63) // 64))


def emulate(x, w, bias, seq, init, dy, x_extra=3, dy_extra=1):
    B, L, I = x.shape
    K = w.shape[0]  # w is [K, I] (tap-major)
    # x and dy strided: [B, L, I + extra], garbage around.
    rng = np.random.default_rng(5)
    xb = rng.standard_normal((B, L, I + x_extra)) * 1e6
    xb[:, :, :I] = x
    dyb = rng.standard_normal((B, L, I + dy_extra)) * 1e6
    dyb[:, :, :I] = dy
    X, x_st, x_sb = Mem("x", xb), I + x_extra, L * (I + x_extra)
    DY, dy_st, dy_sb = Mem("dy", dyb), I + dy_extra, L * (I + dy_extra)
    W, BIAS = Mem("w", w), Mem("bias", bias)
    SEQ = Mem("seq", seq) if seq is not None else None
    INIT = Mem("init", init) if init is not None else None  # [B, K-1, I]
    n = B * L * I
    e = np.arange(n)
    live = np.ones(n, dtype=bool)

    # forward_kernel
    i, bt = e % I, e // I
    t, b = bt % L, bt // L
    acc = BIAS.read(i)
    for k in range(K):
        s = t - (K - 1) + k
        ok = same_document(SEQ, b, L, s, t, live)
        acc = acc + np.where(ok & (s >= 0), W.read(k * I + i) * X.read(b * x_sb + i + s * x_st, ok & (s >= 0)), 0.0)
        if INIT is not None:
            m = ok & (s < 0)
            acc = acc + np.where(m, W.read(k * I + i) * INIT.read((b * (K - 1) + (K - 1 + s)) * I + i, m), 0.0)
    Y = Mem("y", np.full(n, np.nan))
    Y.write(e, acc)

    # dx_kernel
    s = t  # e -> (b, s, i)
    acc = np.zeros(n)
    for k in range(K):
        r = s + (K - 1) - k
        m = r < L
        m = m & same_document(SEQ, b, L, s, np.where(m, r, 0), m)
        acc = acc + np.where(m, W.read(k * I + i) * DY.read(b * dy_sb + i + r * dy_st, m), 0.0)
    DX = Mem("dx", np.full(n, np.nan))
    DX.write(e, acc)

    # dinit_kernel
    DINIT = None
    if INIT is not None and K > 1:
        H = K - 1
        e2 = np.arange(B * H * I)
        i2, bj = e2 % I, e2 // I
        j, b2 = bj % H, bj // H
        acc = np.zeros(e2.size)
        for k in range(K):
            tt = j - k
            m = (tt >= 0) & (tt < L)
            m = m & same_document(SEQ, b2, L, np.full(e2.size, -1), np.where(m, tt, 0), m)
            acc = acc + np.where(m, W.read(k * I + i2) * DY.read(b2 * dy_sb + i2 + tt * dy_st, m), 0.0)
        DINIT = Mem("dinit", np.full(e2.size, np.nan))
        DINIT.write(e2, acc)

    # dw_kernel, block by block
    R = partial_rows(B, L)
    rows = B * L
    rows_per = (rows + R - 1) // R
    DW = Mem("dw_part", np.full(R * K * I, np.nan))
    DB = Mem("dbias_part", np.full(R * I, np.nan))
    tid = np.arange(K_THREADS)
    c, lane = tid % K_CHANNELS, tid // K_CHANNELS
    for bx in range((I + K_CHANNELS - 1) // K_CHANNELS):
        ii = bx * K_CHANNELS + c
        valid = ii < I
        for by in range(R):
            r0 = by * rows_per
            r1 = min(r0 + rows_per, rows)
            acc = np.zeros((K_MAX_TAPS + 1, K_THREADS))
            r = r0 + lane
            while True:
                m = valid & (r < r1)
                if not m.any():
                    break
                bb, tt = r // L, r % L
                g = DY.read(bb * dy_sb + tt * dy_st + ii, m)
                acc[K_MAX_TAPS] += np.where(m, g, 0.0)
                for k in range(K):
                    s = tt - (K - 1) + k
                    ok = m & same_document(SEQ, bb, L, s, np.where(m, tt, 0), m)
                    acc[k] += np.where(ok & (s >= 0), g * X.read(bb * x_sb + ii + s * x_st, ok & (s >= 0)), 0.0)
                    if INIT is not None:
                        mi = ok & (s < 0)
                        acc[k] += np.where(mi, g * INIT.read((bb * (K - 1) + (K - 1 + s)) * I + ii, mi), 0.0)
                r = r + K_ROW_LANES
            lanes = acc.reshape(K_MAX_TAPS + 1, K_ROW_LANES, K_CHANNELS)  # [k][lane][c], as in shared memory
            w0 = (lane == 0) & valid
            for k in range(K_MAX_TAPS + 1):
                if k < K or k == K_MAX_TAPS:
                    total = lanes[k].sum(0)[c]  # lane 0 of channel c adds the 8 lanes
                    if k == K_MAX_TAPS:
                        DB.write(by * I + ii, total, w0)
                    else:
                        DW.write((by * K + k) * I + ii, total, w0)
    for m in [Y, DX, DW, DB] + ([DINIT] if DINIT is not None else []):
        assert (m.writes == 1).all(), f"{m.name}: {np.sum(m.writes != 1)} elements not written exactly once"
    out = {"y": Y.a.reshape(B, L, I), "dx": DX.a.reshape(B, L, I),
           "dw": DW.a.reshape(R, K, I).sum(0), "dbias": DB.a.reshape(R, I).sum(0)}
    if DINIT is not None:
        out["dinit"] = DINIT.a.reshape(B, K - 1, I)
    return out


def reference(x, w, bias, seq, init, dy):
    """causal_conv1d_ref's masked window in float64, differentiated by autograd."""
    B, L, I = x.shape
    K = w.shape[0]
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, bias))
    ti = torch.tensor(init, requires_grad=True) if init is not None else None
    head = ti if ti is not None else torch.zeros(B, K - 1, I, dtype=torch.float64)
    xp = torch.cat([head, tx], 1)
    sq = torch.tensor(seq.reshape(B, L)) if seq is not None else None
    doc = torch.cat([sq[:, :1].expand(B, K - 1), sq], 1) if sq is not None else None
    y = tb.expand(B, L, I)
    for k in range(K):
        tap = xp[:, k:k + L] * tw[k]
        if doc is not None:
            tap = tap * (doc[:, k:k + L] == sq).unsqueeze(-1).double()
        y = y + tap
    (y * torch.tensor(dy)).sum().backward()
    out = {"y": y.detach().numpy(), "dx": tx.grad.numpy(), "dw": tw.grad.numpy(), "dbias": tb.grad.numpy()}
    if ti is not None and K > 1:
        out["dinit"] = ti.grad.numpy()
    return out


CASES = [(1, 1, 1, 4), (2, 3, 5, 4), (3, 37, 67, 4), (2, 130, 129, 2), (1, 9, 20, 5), (4, 600, 40, 4), (2, 5, 3, 1)]


@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}_L{c[1]}_I{c[2]}_K{c[3]}" for c in CASES])
@pytest.mark.parametrize("with_seq,with_init", [(True, True), (True, False), (False, True)])
def test_conv_emulation_matches_reference(case, with_seq, with_init):
    B, L, I, K = case
    r = np.random.default_rng(sum(case) + 10 * with_seq + with_init)
    x, w, bias = r.standard_normal((B, L, I)), r.standard_normal((K, I)), r.standard_normal(I)
    dy = r.standard_normal((B, L, I))
    init = r.standard_normal((B, K - 1, I)) if with_init else None
    seq = None
    if with_seq:
        start = r.random((B, L)) < 1 / 3
        start[:, 0] = False
        seq = np.cumsum(start, 1).astype(np.int32).reshape(-1)
    got, want = emulate(x, w, bias, seq, init, dy), reference(x, w, bias, seq, init, dy)
    assert set(got) == set(want)
    for k, v in want.items():
        scale = max(np.abs(v).max(), 1e-30)
        err = np.abs(got[k] - v).max() / scale
        assert err < 1e-12, f"{k}: max |diff| / scale = {err:.3e}"
