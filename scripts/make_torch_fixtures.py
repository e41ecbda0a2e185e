#!/usr/bin/python3
"""Reference Hessians computed by PyTorch (float64) for tests/test_hessian_torch.cpp.

    /usr/bin/python3 scripts/make_torch_fixtures.py            # writes tests/fixtures/torch/
    /usr/bin/python3 scripts/make_torch_fixtures.py --out DIR

Run it with Debian's interpreter (python3-torch 1.13, python3-numpy). Every
case is a small MLP (nn.Sequential of nn.Linear and an activation, PyTorch's
default initialisation, float64), a batch of inputs, targets and a loss. The
parameters are flattened in registration order (row-major, as
parameters_to_vector does) into one vector theta of the *selected* parameters
(a frozen parameter is left out, a params subset keeps only the named ones);
every Hessian is taken with torch.autograd.functional on a function of theta,
the other parameters held at their values (as in /work/shared/anchors/anchor_torch.py).

Layout (all .npy files float64, C order, except integer class targets: int64):

    tests/fixtures/torch/cases.txt          one line per case: name key=value ...
    tests/fixtures/torch/<case>/params/<name>.npy   every parameter (Module::load format)
    tests/fixtures/torch/<case>/x.npy       inputs [B, in]
    tests/fixtures/torch/<case>/y.npy       targets ([B, C] floats, or [B] int64 class indices)
    tests/fixtures/torch/<case>/loss.npy    loss value (0-d)
    tests/fixtures/torch/<case>/loss_hessian.npy        [n, n]
    tests/fixtures/torch/<case>/batch_loss_hessian.npy  [B, n, n]  (each sample's loss alone, same reduction)
    tests/fixtures/torch/<case>/model_hessian.npy       [2, C, n, n]  (each output entry of each sample alone,
                                                         for the first two samples x[:2] only: size)
    tests/fixtures/torch/<case>/v.npy, hvp.npy          [n], H v   (torch.autograd.functional.hvp)
    tests/fixtures/torch/<case>/vs.npy, hvps.npy        [2, n], rows H v_i
    tests/fixtures/torch/<case>/diagonal.npy            [n]
    tests/fixtures/torch/<case>/sharpness.npy           0-d: max |eigvalsh(loss Hessian)|
    tests/fixtures/torch/<case>/batch_sharpness.npy     [B]
    tests/fixtures/torch/<case>/model_sharpness.npy     [2, C]

cases.txt keys: widths (comma-separated), act (tanh|sigmoid|softplus|gelu),
loss (mse|cross_entropy|bce_with_logits), reduction (mean|sum),
model_batch (samples of the model Hessian), target (float: randn | binary: 0/1 floats | index: int64 classes | prob: rows of
softmax), batch, n (selected scalars), frozen (names,
comma-separated, or -), params (the subset, or - for every trainable one).

The numbers depend only on the seeds and torch's generator, not on this
machine; rerunning the script reproduces the files byte for byte with the
same torch version.
"""
import argparse
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.stateless import functional_call

AF = torch.autograd.functional
DT = torch.float64
# The model Hessians are taken for the first MODEL_BATCH samples only (x[:2]),
# which keeps the fixtures small; the test passes the same two inputs.
MODEL_BATCH = 2

# name, widths, activation, loss, reduction, target kind, batch, frozen, params subset
CASES = [
    ("tanh_mse_sum", [3, 5, 2], "tanh", "mse", "sum", "float", 6, [], []),
    ("sigmoid_mse_mean", [3, 5, 2], "sigmoid", "mse", "mean", "float", 5, [], []),
    ("softplus_ce_index", [4, 6, 3], "softplus", "cross_entropy", "mean", "index", 4, [], []),
    ("gelu_ce_prob", [4, 6, 3], "gelu", "cross_entropy", "mean", "prob", 4, [], []),
    ("tanh3_bce_soft", [3, 4, 4, 2], "tanh", "bce_with_logits", "mean", "float", 5, [], []),
    ("softplus_bce_hard", [3, 5, 2], "softplus", "bce_with_logits", "mean", "binary", 8, [], []),
    ("sigmoid3_ce_index", [3, 4, 4, 3], "sigmoid", "cross_entropy", "mean", "index", 6, [], []),
    ("gelu3_mse_sum", [3, 4, 4, 2], "gelu", "mse", "sum", "float", 4, [], []),
    ("frozen_bias_tanh_ce", [4, 6, 3], "tanh", "cross_entropy", "mean", "index", 5, ["0.bias"], []),
    ("subset_sigmoid_mse", [4, 6, 3], "sigmoid", "mse", "sum", "float", 4, [], ["2.weight"]),
]

ACTS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus,
        "gelu": lambda: nn.GELU(approximate="none")}


def make_net(widths, act):
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], dtype=DT))
        if i + 2 < len(widths):
            layers.append(ACTS[act]())
    net = nn.Sequential(*layers)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def make_targets(kind, batch, nout):
    if kind == "float":
        return torch.randn(batch, nout, dtype=DT)
    if kind == "index":
        return torch.randint(0, nout, (batch,))
    if kind == "prob":
        return torch.softmax(torch.randn(batch, nout, dtype=DT), dim=1)
    if kind == "binary":
        return torch.bernoulli(torch.full((batch, nout), 0.5, dtype=DT))
    raise KeyError(kind)


def criterion(loss, reduction):
    if loss == "mse":
        return lambda z, y: F.mse_loss(z, y, reduction=reduction)
    if loss == "cross_entropy":
        return lambda z, y: F.cross_entropy(z, y, reduction=reduction)
    if loss == "bce_with_logits":
        return lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction=reduction)
    raise KeyError(loss)


def build_case(index, spec):
    name, widths, act, loss, reduction, target, batch, frozen, subset = spec
    torch.manual_seed(1000 + index)
    net = make_net(widths, act)
    X = torch.randn(batch, widths[0], dtype=DT)
    Y = make_targets(target, batch, widths[-1])
    named = [(k, v.detach().clone()) for k, v in net.named_parameters()]
    selected = [(k, v) for k, v in named
                if k not in frozen and (not subset or k in subset)]
    shapes = [(k, v.shape) for k, v in selected]
    theta = torch.cat([v.reshape(-1) for _, v in selected])
    crit = criterion(loss, reduction)

    def params_of(t):
        out, o = {}, 0
        for k, s in shapes:
            m = int(np.prod(s)) if len(s) else 1
            out[k] = t[o:o + m].view(s)
            o += m
        return out

    def model(t, x):
        return functional_call(net, params_of(t), (x,))

    def loss_fn(t, x=X, y=Y):
        return crit(model(t, x), y)

    n = theta.numel()
    C = widths[-1]
    res = {}
    res["loss"] = loss_fn(theta).detach()
    H = AF.hessian(loss_fn, theta)
    res["loss_hessian"] = H
    res["batch_loss_hessian"] = torch.stack(
        [AF.hessian(lambda t, b=b: loss_fn(t, X[b:b + 1], Y[b:b + 1]), theta) for b in range(batch)])
    MH = torch.empty(MODEL_BATCH, C, n, n, dtype=DT)
    for b in range(MODEL_BATCH):
        for k in range(C):
            MH[b, k] = AF.hessian(lambda t, b=b, k=k: model(t, X[b:b + 1])[0, k], theta)
    res["model_hessian"] = MH
    v = torch.randn(n, dtype=DT)
    v = v / v.norm()
    vs = torch.randn(2, n, dtype=DT)
    res["v"] = v
    res["hvp"] = AF.hvp(loss_fn, theta, v)[1]
    res["vs"] = vs
    res["hvps"] = torch.stack([AF.hvp(loss_fn, theta, vs[i])[1] for i in range(2)])
    res["diagonal"] = torch.diagonal(H).clone()
    res["sharpness"] = torch.linalg.eigvalsh(H).abs().max()
    res["batch_sharpness"] = torch.linalg.eigvalsh(res["batch_loss_hessian"]).abs().amax(-1)
    res["model_sharpness"] = torch.linalg.eigvalsh(MH).abs().amax(-1)

    # self-consistency of the reference (two routes to the same numbers)
    assert (res["hvp"] - H @ v).abs().max() <= 1e-12 * max(1.0, H.abs().max())
    assert (H - H.T).abs().max() <= 1e-13 * max(1.0, H.abs().max())
    if reduction == "sum":  # the sum's Hessian is the sum of the per-sample ones
        assert (res["batch_loss_hessian"].sum(0) - H).abs().max() <= 1e-12 * max(1.0, H.abs().max())

    meta = {"widths": ",".join(map(str, widths)), "act": act, "loss": loss, "reduction": reduction,
            "target": target,
            "batch": str(batch), "model_batch": str(MODEL_BATCH), "n": str(n), "frozen": ",".join(frozen) or "-",
            "params": ",".join(subset) or "-"}
    return net, X, Y, res, meta


def save(path, t):
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    if a.dtype != np.int64:
        a = a.astype(np.float64)
    np.save(path, np.array(a, order="C"), allow_pickle=False)  # (ascontiguousarray makes 0-d 1-d)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "torch"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = os.path.normpath(a.out)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    lines = ["# generated by scripts/make_torch_fixtures.py (torch %s, numpy %s); do not edit"
             % (torch.__version__, np.__version__),
             "# name widths act loss reduction target batch model_batch n frozen params"]
    total = 0
    for i, spec in enumerate(CASES):
        net, X, Y, res, meta = build_case(i, spec)
        d = os.path.join(out, spec[0])
        os.makedirs(os.path.join(d, "params"))
        for k, v in net.named_parameters():
            save(os.path.join(d, "params", k + ".npy"), v)
        save(os.path.join(d, "x.npy"), X)
        save(os.path.join(d, "y.npy"), Y)
        for k, v in res.items():
            save(os.path.join(d, k + ".npy"), v)
        lines.append(spec[0] + " " + " ".join("%s=%s" % kv for kv in meta.items()))
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
        total += size
        print("%-22s n=%-3s B=%-2s loss=%.6g sharpness=%.6g  %6.1f kB"
              % (spec[0], meta["n"], meta["batch"], float(res["loss"]), float(res["sharpness"]), size / 1024),
              file=sys.stderr)
    with open(os.path.join(out, "cases.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("total %.1f kB in %s" % (total / 1024, out), file=sys.stderr)


if __name__ == "__main__":
    main()
