#!/usr/bin/env python3
"""The bytes each rank of a Coil run sends per step, per link class, from the model's shapes, the
batch geometry and the collectives' algorithms; and, for a cluster, the time they take against the
compute time at an MFU target. docs/SCALING.md explains the model; tests/test_network_bytes.sh
checks it against bytes measured on the wire. Independent of coil (the standard library only).

What Coil's collectives move (dist/fsdp.cpp, dist/sharded_muon.cpp), per shard group of p ranks:
  - a unit's all-gather: a flat buffer of p x (the unit's shards, each cast to its gather dtype,
    each padded to 8 bytes); ring: every rank sends and receives (p - 1) / p of it;
  - a unit's reduce-scatter: p x (the unit's shard elements) in the reduce dtype; ring: the same;
  - HSDP: every reduce-scattered shard all-reduced over the R replicas; ring: 2 (R - 1) / R of it;
  - Muon, per optimizer step: each matrix's float32 update gathered whole to its owner and its rows
    scattered back (every non-owner sends its shard once and receives it once);
  - ZeRO-3 (reshard_after_forward): per micro batch, the forward all-gathers every unit (the
    embedding unit, the blocks, the head unit = embedding + norm_f), the backward all-gathers
    the blocks again (not the embedding unit, whose backward needs only the token ids, nor the
    head unit, fused with the loss: its forward made its gradients) and reduce-scatters every
    unit; ZeRO-2: each unit
    all-gathered once per step, reduce-scattered once per step;
  - evaluation: every unit all-gathered per evaluation batch (forward only);
  - the step's scalar sums (target count and batch hash; loss, gradient norm, stop, saver): two
    all-reduces of 3 and 4 doubles over every rank.

Link classes: a ring over a group with g ranks per node on several nodes crosses each node
boundary once per ring; NCCL runs g such rings (channels), one leaving each GPU's NIC, so 1 / g of
a rank's ring bytes cross nodes and (g - 1) / g stay on the node. A group inside one node: all
intra-node. Point to point (Muon): the share of peers on other nodes.

  python3 bench/network_model.py --table            # the cluster table of docs/SCALING.md
  python3 bench/network_model.py --d-model 64 --n-layer 2 --vocab 304 --world 4 --shard 2 \
      --micro-batches 2 --json                      # one configuration, bytes per rank per step
"""

import argparse
import json
import math

PRESETS = {"130m": (768, 24), "370m": (1024, 48), "1.4b": (2048, 48), "2.8b": (2560, 64)}
ESIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
KEEPS_FLOAT32 = ("norm.weight", "norm_f.weight", "mixer.A_log", "mixer.D", "mixer.dt_proj.bias")
MUON = ("mixer.in_proj.weight", "mixer.x_proj.weight", "mixer.out_proj.weight")


def units(d_model, n_layer, vocab, d_state=16, d_conv=4, expand=2, pad_vocab=8):
    """The FSDP units of dist/fsdp.cpp, in forward order: lists of (name, shape)."""
    H, I, N, K = d_model, expand * d_model, d_state, d_conv
    R = (d_model + 15) // 16
    V = (vocab + pad_vocab - 1) // pad_vocab * pad_vocab
    emb = ("backbone.embeddings.weight", (V, H))
    out = [[emb]]
    for b in range(n_layer):
        p = f"backbone.layers.{b}."
        out.append([(p + "norm.weight", (H,)), (p + "mixer.in_proj.weight", (2 * I, H)),
                    (p + "mixer.conv1d.weight", (I, 1, K)), (p + "mixer.conv1d.bias", (I,)),
                    (p + "mixer.x_proj.weight", (R + 2 * N, I)), (p + "mixer.dt_proj.weight", (I, R)),
                    (p + "mixer.dt_proj.bias", (I,)), (p + "mixer.A_log", (I, N)), (p + "mixer.D", (I,)),
                    (p + "mixer.out_proj.weight", (H, I))])
    out.append([emb, ("backbone.norm_f.weight", (H,))])
    return out


def local_numel(shape, p):
    rows = shape[0]
    row = math.prod(shape[1:])
    return (rows + p - 1) // p * row


def gather_dtype(name, compute):
    return "float32" if name.endswith(KEEPS_FLOAT32) else compute


def ag_buffer(unit, p, compute):  # bytes of the whole all-gather buffer (every rank's part)
    return p * sum((local_numel(s, p) * ESIZE[gather_dtype(n, compute)] + 7) // 8 * 8 for n, s in unit)


def rs_buffer(unit, p, reduce):  # bytes of the reduce-scatter's send buffer
    return p * sum(local_numel(s, p) for _, s in unit) * ESIZE[reduce]


def ring_split(nbytes, group_per_node, nodes_spanned):
    """(intra, inter) bytes of a rank's ring traffic (sent, or received)."""
    if nodes_spanned <= 1:
        return nbytes, 0.0
    return nbytes * (group_per_node - 1) / group_per_node, nbytes / group_per_node


def butterfly_split(nbytes, group_per_node, nodes_spanned):
    """(intra, inter) bytes of a rank's butterfly reduce-scatter (Open MPI's tuned algorithm 4, the
    one the wire checks fix): over p = power-of-two ranks, round k = 1, 2, ... exchanges B / 2^k
    with the rank at distance 2^(k - 1), nearest first; with g consecutive ranks per node the rounds
    at distances >= g cross nodes: B (1 / g - 1 / p) of the (p - 1) / p B a rank sends."""
    if nodes_spanned <= 1:
        return nbytes, 0.0
    g, p = group_per_node, group_per_node * nodes_spanned
    inter = nbytes * (p / g - 1) / (p - 1)
    return nbytes - inter, inter


def step_bytes(cfg, world, shard, ranks_per_node, micro_batches=1, zero2=False, compute="float32",
               reduce="float32", muon=True, eval_batches=0, evals_per_step=0.0, reduce_scatter="ring"):
    """Bytes one rank sends per optimizer step (= receives, on average), by collective and class.
    reduce_scatter: "ring" (NCCL) or "butterfly" (Open MPI's, as the wire checks fix it): the same
    bytes, another split between the link classes.
    Returns a dict {collective: (intra, inter)} and the ring steps (latency terms) per class."""
    us = units(*cfg)
    p, R = shard, world // shard
    nodes = max(1, world // ranks_per_node)
    # Shard groups are consecutive ranks; the replicate group one rank per shard group.
    shard_per_node = min(p, ranks_per_node)
    shard_nodes = max(1, p // ranks_per_node)
    rep_per_node = max(1, ranks_per_node // p) if p < ranks_per_node else 1
    rep_nodes = max(1, R // rep_per_node)
    ring = lambda b: (p - 1) / p * b
    ag_all = sum(ring(ag_buffer(u, p, compute)) for u in us)
    ag_bwd = sum(ring(ag_buffer(u, p, compute)) for u in us[1:-1])
    rs_all = sum(ring(rs_buffer(u, p, reduce)) for u in us)
    n_ag = len(us)
    out, steps = {}, {"intra": 0, "inter": 0}
    rs_split = {"ring": ring_split, "butterfly": butterfly_split}[reduce_scatter]

    def add(key, nbytes, per_node, spanned, collectives, group, split=ring_split):
        intra, inter = split(nbytes, per_node, spanned)
        a, b = out.get(key, (0.0, 0.0))
        out[key] = (a + intra, b + inter)
        if group > 1:
            steps["inter" if spanned > 1 else "intra"] += collectives * (group - 1)

    if p > 1:
        if zero2:
            add("all-gather (forward, once per step)", ag_all, shard_per_node, shard_nodes, n_ag, p)
            add("reduce-scatter (once per step)", rs_all, shard_per_node, shard_nodes, n_ag, p, rs_split)
        else:
            add("all-gather (forward)", micro_batches * ag_all, shard_per_node, shard_nodes, micro_batches * n_ag, p)
            add("all-gather (backward)", micro_batches * ag_bwd, shard_per_node, shard_nodes,
                micro_batches * (n_ag - 1), p)
            add("reduce-scatter (backward)", micro_batches * rs_all, shard_per_node, shard_nodes,
                micro_batches * n_ag, p, rs_split)
        if eval_batches and evals_per_step:
            add("all-gather (evaluation)", evals_per_step * eval_batches * ag_all, shard_per_node, shard_nodes,
                evals_per_step * eval_batches * n_ag, p)
    if R > 1:
        shard_bytes = sum(sum(local_numel(s, p) for _, s in u) * ESIZE[reduce] for u in us)
        times = 1 if zero2 else micro_batches
        add("all-reduce over replicas", times * 2 * (R - 1) / R * shard_bytes, rep_per_node, rep_nodes,
            times * n_ag * 2, R)
    if muon and p > 1:
        # Per matrix: p - 1 shards travel to the owner and back: 2 (p - 1) / p shards per rank on average.
        m = sum(local_numel(s, p) * 4 for u in us for n, s in u if n.endswith(MUON))
        per_rank = 2 * (p - 1) / p * m
        off = (p - shard_per_node) / (p - 1) if shard_nodes > 1 else 0.0
        a, b = out.get("Muon gather + scatter", (0.0, 0.0))
        out["Muon gather + scatter"] = (a + per_rank * (1 - off), b + per_rank * off)
    if world > 1:  # the step's scalar sums: ring all-reduce of 3 and 4 doubles (latency, not bytes)
        out["scalar all-reduces"] = (2 * (world - 1) / world * 56, 0.0)
    return out, steps


def totals(parts):
    return sum(v[0] for v in parts.values()), sum(v[1] for v in parts.values())


def flops_per_token(d_model, n_layer, vocab, d_state=16, expand=2):  # launch/metrics.cpp's
    H, I, N, R = d_model, expand * d_model, d_state, (d_model + 15) // 16
    V = (vocab + 7) // 8 * 8
    return 6 * (n_layer * (2 * I * H + (R + 2 * N) * I + I * R + H * I) + V * H)


def params(cfg):
    seen, n = set(), 0
    for u in units(*cfg):
        for name, s in u:
            if name not in seen:
                seen.add(name)
                n += math.prod(s)
    return n


# ---- The cluster table ---------------------------------------------------------------------------

NVLINK = 450e9         # bytes/s per direction per GPU within a node (H200, NVLink 4)
IB = 400e9 / 8         # bytes/s per direction per GPU between nodes (one 400 Gb/s NIC per GPU)
ALPHA_INTRA, ALPHA_INTER = 3e-6, 10e-6  # seconds per ring step
PEAK, MFU = 989e12, 0.5
GPUS_PER_NODE = 8


def comm_time(parts, steps):
    intra, inter = totals(parts)
    return max(intra / NVLINK, inter / IB) + steps["intra"] * ALPHA_INTRA + steps["inter"] * ALPHA_INTER


def table(tokens_per_gpu=8 * 2048, out=print):
    layouts = [("FSDP (ZeRO-3)", lambda w: w, False), ("ZeRO-2", lambda w: w, False),
               ("HSDP 8 x nodes", lambda w: GPUS_PER_NODE, False)]
    out(f"| model | nodes | layout | GB/GPU/step NVLink | GB/GPU/step IB | comm s/step | compute s/step | "
        f"comm / compute | model state GiB/GPU | hidden |")
    out("|---|---|---|---|---|---|---|---|---|---|")
    for name, (h, l) in PRESETS.items():
        cfg = (h, l, 50280)
        P = params(cfg)
        compute_s = flops_per_token(*cfg) * tokens_per_gpu / (PEAK * MFU)
        for nodes in (8, 64):
            world = nodes * GPUS_PER_NODE
            for lname, shard_of, _ in layouts:
                zero2 = lname == "ZeRO-2"
                shard = shard_of(world)
                parts, steps = step_bytes(cfg, world, shard, GPUS_PER_NODE, micro_batches=1, zero2=zero2,
                                          compute="bfloat16", reduce="float32")
                intra, inter = totals(parts)
                t = comm_time(parts, steps)
                state = P * 16 / shard / 2**30  # float32 weights, gradients, two AdamW moments
                out(f"| {name} | {nodes} | {lname} | {intra / 1e9:.2f} | {inter / 1e9:.2f} | {t:.3f} | "
                    f"{compute_s:.3f} | {t / compute_s:.2f} | {state:.2f} | {'yes' if t < compute_s else 'no'} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", action="store_true", help="the cluster table (docs/SCALING.md)")
    ap.add_argument("--tokens-per-gpu", type=int, default=8 * 2048)
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--shard", type=int, default=0, help="shard degree (0: the world)")
    ap.add_argument("--ranks-per-node", type=int, default=0, help="0: every rank on one node")
    ap.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation per rank")
    ap.add_argument("--zero2", action="store_true", help="train.reshard_after_forward = false")
    ap.add_argument("--compute", default="float32", choices=sorted(ESIZE))
    ap.add_argument("--reduce", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-muon", action="store_true")
    ap.add_argument("--eval-batches", type=int, default=0)
    ap.add_argument("--evals-per-step", type=float, default=0.0)
    ap.add_argument("--reduce-scatter", default="ring", choices=["ring", "butterfly"],
                    help="its algorithm: ring (NCCL) or butterfly (Open MPI's, as the wire checks fix it)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.table:
        table(a.tokens_per_gpu)
        return
    cfg = (*PRESETS[a.preset], 50280) if a.preset else (a.d_model, a.n_layer, a.vocab)
    shard = a.shard or a.world
    if a.world % shard:
        raise SystemExit(f"--shard {shard} does not divide --world {a.world}")
    parts, steps = step_bytes(cfg, a.world, shard, a.ranks_per_node or a.world, a.micro_batches, a.zero2, a.compute,
                              a.reduce, not a.no_muon, a.eval_batches, a.evals_per_step, a.reduce_scatter)
    intra, inter = totals(parts)
    if a.json:
        print(json.dumps({"intra": intra, "inter": inter, "per_collective": parts, "ring_steps": steps}))
        return
    for k, (x, y) in parts.items():
        print(f"{k:40s} intra {x / 1e6:12.3f} MB  inter {y / 1e6:12.3f} MB")
    print(f"{'total per rank per step':40s} intra {intra / 1e6:12.3f} MB  inter {inter / 1e6:12.3f} MB")


if __name__ == "__main__":
    main()
