#!/usr/bin/env python3
"""Research probe (PyTorch, GPU): can any distillation recipe lift the 20,490-parameter
student-cnn by 1 point over its labels-only baseline on Fashion-MNIST?

Not part of the pipeline. It answers, in minutes on a GPU, questions that take hours on the
2-core CPU: does a stronger teacher (ResNet-18 ensemble, ~95%) help where our 93.5% googlenet-bn
does not; does the student without dropout or trained longer leave more room; does online,
consistent augmentation ("function matching", Beyer et al. 2022) help.

Many students train at once as one grouped network (grouped convolutions, a batched linear
layer): each student has its own parameters, data order, dropout masks, targets and loss weights,
and Adam is element-wise, so this is N independent trainings in one pass. Students of the same
replicate share their initial weights and data order, so differences between configurations are
paired, like `just compare`'s seeds.

  python3 kd_probe.py --data DIR --knowledge soft-targets.safetensors --out OUT [--quick]
"""
import argparse
import gzip
import json
import math
import os
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN, STD = 0.2860, 0.3530


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    t = torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8)
    return t.reshape(dims)


def load_knowledge(path):
    """The pipeline's knowledge file: logits.main [60000, 10] in IDX order, and labels."""
    with open(path, "rb") as f:
        n, = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        body = f.read()
    out = {}
    for name in ("logits.main", "labels"):
        m = header[name]
        s, e = m["data_offsets"]
        dt = {"F32": torch.float32, "U32": torch.int32}[m["dtype"]]
        out[name] = torch.frombuffer(bytearray(body[s:e]), dtype=dt).reshape(m["shape"])
    return out["logits.main"], out["labels"].long()


def augment(x, gen, pad=2):
    """Random crop of the image padded by `pad` (padding = black pixels) and horizontal flip,
    one draw per image: the pipeline's `CropFlip { crop_padding: 2 }`."""
    b = x.shape[0]
    xp = F.pad(x, (pad, pad, pad, pad), value=-MEAN / STD)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=gen)
    oy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=gen)
    ar = torch.arange(28, device=x.device)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    out = xp[torch.arange(b, device=x.device)[:, None, None], 0, rows, cols][:, None]
    flip = torch.rand(b, device=x.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


# ----------------------------------------------------------------------------- teachers
class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.sc = None
        if stride != 1 or cin != cout:
            self.sc = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return F.relu(y + (x if self.sc is None else self.sc(x)))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, no stem pool) for 1x28x28."""

    def __init__(self, width=64, classes=10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        layers, cin = [], w
        for i, c in enumerate((w, 2 * w, 4 * w, 8 * w)):
            for j in range(2):
                layers.append(Block(cin, c, 2 if (i > 0 and j == 0) else 1))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def train_teacher(seed, xtr, ytr, xev, epochs, width, dev, bs=256):
    torch.manual_seed(seed)
    gen = torch.Generator(device=dev).manual_seed(seed)
    model = ResNet18(width).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    n = xtr.shape[0]
    steps = epochs * (n // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n, device=dev, generator=gen)
        for k in range(n // bs):
            idx = perm[k * bs:(k + 1) * bs]
            x = augment(xtr[idx], gen).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = F.cross_entropy(model(x), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"teacher seed {seed} epoch {ep + 1}/{epochs} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    model.eval()
    return model


@torch.no_grad()
def logits_of(models, x, chunk=2048):
    out = []
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk].contiguous(memory_format=torch.channels_last)
        out.append(torch.stack([m(xb).float() for m in models]).mean(0))
    return torch.cat(out)


# ----------------------------------------------------------------------------- students
class Students(nn.Module):
    """N independent student-cnn networks (conv3x3 1->16, pool, conv3x3 16->32, pool, dropout,
    fc 1568->10) evaluated on N different inputs at once: x is [B, N, 28, 28]."""

    def __init__(self, n, replicate_of, dropout, dev):
        super().__init__()
        self.n = n
        self.w1 = nn.Parameter(torch.empty(16 * n, 1, 3, 3, device=dev))
        self.b1 = nn.Parameter(torch.empty(16 * n, device=dev))
        self.w2 = nn.Parameter(torch.empty(32 * n, 16, 3, 3, device=dev))
        self.b2 = nn.Parameter(torch.empty(32 * n, device=dev))
        self.w3 = nn.Parameter(torch.empty(n, 1568, 10, device=dev))
        self.b3 = nn.Parameter(torch.empty(n, 10, device=dev))
        self.register_buffer("p", torch.tensor(dropout, device=dev, dtype=torch.float32))
        # PyTorch's default init (bound 1/sqrt(fan_in) for weights and biases), drawn per
        # replicate so that students of one replicate start from the same weights.
        with torch.no_grad():
            for s, r in enumerate(replicate_of):
                g = torch.Generator().manual_seed(1000 + r)

                def u(shape, fan_in):
                    b = 1 / math.sqrt(fan_in)
                    return (torch.rand(shape, generator=g) * 2 - 1) * b

                self.w1[16 * s:16 * s + 16] = u((16, 1, 3, 3), 9).to(dev)
                self.b1[16 * s:16 * s + 16] = u((16,), 9).to(dev)
                self.w2[32 * s:32 * s + 32] = u((32, 16, 3, 3), 144).to(dev)
                self.b2[32 * s:32 * s + 32] = u((32,), 144).to(dev)
                self.w3[s] = u((10, 1568), 1568).t().to(dev)
                self.b3[s] = u((10,), 1568).to(dev)

    def forward(self, x):
        b = x.shape[0]
        h = F.max_pool2d(F.relu(F.conv2d(x, self.w1, self.b1, padding=1, groups=self.n)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, self.w2, self.b2, padding=1, groups=self.n)), 2)
        h = h.reshape(b, self.n, 1568)
        if self.training:
            keep = 1 - self.p[None, :, None]
            h = h * (torch.rand_like(h) < keep) / keep
        return torch.einsum("bnf,nfc->bnc", h, self.w3) + self.b3


def train_students(jobs, data, banks, teachers_online, epochs, dev, bs=128, lr=2e-3, replicates=3):
    """jobs: list of dicts (name, teacher, T, hard, soft, dropout, augment, online). Each job is
    trained once per replicate. Returns {name: [test acc at best val epoch per replicate]}."""
    xtr, ytr, xval, yval, xte, yte = data
    students = [(j, r) for j in jobs for r in range(replicates)]
    n = len(students)
    rep = [r for _, r in students]
    model = Students(n, rep, [j["dropout"] for j, _ in students], dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ntr = xtr.shape[0]
    spe = ntr // bs
    total = epochs * spe
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    T = torch.tensor([j["T"] for j, _ in students], device=dev)
    hard = torch.tensor([j["hard"] for j, _ in students], device=dev)
    soft = torch.tensor([j["soft"] for j, _ in students], device=dev)
    bank_names = sorted(banks)
    bank = torch.stack([banks[k] for k in bank_names])  # [K, 60000(train idx space), 10]
    tsel = torch.tensor([bank_names.index(j["teacher"]) if j["teacher"] else 0 for j, _ in students], device=dev)
    aug = torch.tensor([j["augment"] for j, _ in students], device=dev)
    online = [s for s, (j, _) in enumerate(students) if j["online"]]
    aug_any = bool(aug.any())
    gens = [torch.Generator(device=dev).manual_seed(r) for r in range(replicates)]
    auggen = torch.Generator(device=dev).manual_seed(12345)
    val_hist, test_hist = [], []
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perms = torch.stack([torch.randperm(ntr, device=dev, generator=g) for g in gens])
        perm = perms[torch.tensor(rep, device=dev)]  # [N, ntr]
        for k in range(spe):
            idx = perm[:, k * bs:(k + 1) * bs]  # [N, B]
            x = xtr[idx]  # [N, B, 1, 28, 28]
            if aug_any:
                xa = augment(x.reshape(-1, 1, 28, 28), auggen).reshape(x.shape)
                x = torch.where(aug[:, None, None, None, None], xa, x)
            y = ytr[idx]  # [N, B]
            t = bank[tsel[:, None], idx]  # [N, B, 10]
            if online:
                xo = x[online].reshape(-1, 1, 28, 28)
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    to = logits_of(teachers_online, xo).float()
                t = t.clone()
                t[online] = to.reshape(len(online), bs, 10)
            s = model(x[:, :, 0].transpose(0, 1)).transpose(0, 1)  # [N, B, 10]
            ce = F.cross_entropy(s.reshape(-1, 10), y.reshape(-1), reduction="none").reshape(n, bs).mean(1)
            Tc = T[:, None, None]
            pt = F.softmax(t / Tc, -1)
            kl = (pt * (F.log_softmax(t / Tc, -1) - F.log_softmax(s / Tc, -1))).sum(-1).mean(1) * T * T
            loss = (hard * ce + soft * kl).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            def acc(xs, ys):
                correct = torch.zeros(n, device=dev)
                for i in range(0, xs.shape[0], 1000):
                    xb = xs[i:i + 1000, 0][:, None].expand(-1, n, -1, -1)
                    correct += (model(xb).argmax(-1) == ys[i:i + 1000, None]).float().sum(0)
                return (correct / xs.shape[0] * 100).tolist()

            val_hist.append(acc(xval, yval))
            test_hist.append(acc(xte, yte))
        log(f"students x{n} epoch {ep + 1}/{epochs} ({time.time() - t0:.0f} s)")
    res = {}
    for s, (j, r) in enumerate(students):
        vals = [v[s] for v in val_hist]
        best = max(range(epochs), key=lambda e: (vals[e], -e))
        res.setdefault(j["name"], []).append(round(test_hist[best][s], 2))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--knowledge", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--teacher-seeds", default="0,1", help="ResNet-18 teachers, ensembled")
    ap.add_argument("--plan", default="short", choices=["short", "long"],
                    help="short: 10/30-epoch students; long: 50-epoch students")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    log("device", dev, torch.__version__, torch.cuda.get_device_name() if dev.type == "cuda" else "")
    os.makedirs(a.out, exist_ok=True)
    results = {"device": str(dev)}

    def save():
        with open(os.path.join(a.out, "probe.json"), "w") as f:
            json.dump(results, f, indent=1)

    xall = read_idx(os.path.join(a.data, "train-images-idx3-ubyte.gz"))
    yall = read_idx(os.path.join(a.data, "train-labels-idx1-ubyte.gz")).long()
    xte = read_idx(os.path.join(a.data, "t10k-images-idx3-ubyte.gz"))
    yte = read_idx(os.path.join(a.data, "t10k-labels-idx1-ubyte.gz")).long()
    gl, gl_labels = load_knowledge(a.knowledge)
    assert torch.equal(gl_labels, yall), "knowledge file rows are not in IDX order"
    norm = lambda x: ((x.float() / 255 - MEAN) / STD)[:, None].to(dev)
    xall, xte = norm(xall), norm(xte)
    yall, yte = yall.to(dev), yte.to(dev)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(60000, generator=g).to(dev)
    val_idx, tr_idx = perm[:5000], perm[5000:]
    if a.quick:
        tr_idx, val_idx = tr_idx[:1024], val_idx[:500]
        xte, yte = xte[:500], yte[:500]
    # Students index the train bank by position in tr_idx: re-index banks accordingly.
    xtr, ytr = xall[tr_idx], yall[tr_idx]
    xval, yval = xall[val_idx], yall[val_idx]
    data = (xtr, ytr, xval, yval, xte, yte)

    te_epochs = 1 if a.quick else a.teacher_epochs
    width = 8 if a.quick else 64
    teachers = []
    for seed in [int(x) for x in a.teacher_seeds.split(",")]:
        m = train_teacher(seed, xtr, ytr, None, te_epochs, width, dev)
        teachers.append(m)
        lt = logits_of([m], xte)
        results[f"teacher_resnet18_s{seed}_test"] = round((lt.argmax(1) == yte).float().mean().item() * 100, 2)
        log("teacher", seed, results[f"teacher_resnet18_s{seed}_test"])
        save()
    lte = logits_of(teachers, xte)
    results["teacher_resnet18_ens_test"] = round((lte.argmax(1) == yte).float().mean().item() * 100, 2)
    ltr = logits_of(teachers, xtr)
    g_tr = gl.to(dev)[tr_idx]
    results["train_agreement"] = {
        "R": round((ltr.argmax(1) == ytr).float().mean().item() * 100, 2),
        "G": round((g_tr.argmax(1) == ytr).float().mean().item() * 100, 2),
    }
    banks = {"G": g_tr, "R": ltr, "RG": (2 * ltr + g_tr) / 3}
    log("teachers", results)
    save()

    def job(name, teacher=None, T=1.0, hard=1.0, soft=0.0, dropout=0.4, augment=False, online=False):
        return dict(name=name, teacher=teacher, T=T, hard=hard, soft=soft, dropout=dropout,
                    augment=augment, online=online)

    groups = [
        ("e10", 10, [
            job("base"),
            job("kdG_T1", "G", 1, .55, .45), job("kdG_T4", "G", 4, .1, .9),
            job("kdR_T1", "R", 1, .55, .45), job("kdR_T2", "R", 2, .5, .5), job("kdR_T4", "R", 4, .1, .9),
            job("kdR_T1_soft", "R", 1, 0, 1), job("kdRG_T1", "RG", 1, .55, .45),
            job("base_nodrop", dropout=0), job("kdR_T1_nodrop", "R", 1, .55, .45, 0),
            job("kdR_T4_nodrop", "R", 4, .1, .9, 0),
        ]),
        ("e30", 30, [
            job("base"), job("kdG_T1", "G", 1, .55, .45), job("kdR_T1", "R", 1, .55, .45),
            job("kdR_T4", "R", 4, .1, .9), job("base_nodrop", dropout=0),
            job("kdR_T1_nodrop", "R", 1, .55, .45, 0),
        ]),
        ("e30aug", 30, [
            job("base_aug", augment=True),
            job("kdR_T1_fixed_aug", "R", 1, .55, .45, augment=True),
            job("kdR_T1_online_aug", "R", 1, .55, .45, augment=True, online=True),
            job("kdR_T4_online_aug", "R", 4, .1, .9, augment=True, online=True),
        ]),
    ]
    if a.plan == "long":
        groups = [("e50", 50, [
            job("base"), job("kdR_T1", "R", 1, .55, .45),
            job("base_nodrop", dropout=0), job("kdR_T1_nodrop", "R", 1, .55, .45, 0),
            job("base_aug", augment=True),
            job("kdR_T1_online_aug", "R", 1, .55, .45, augment=True, online=True),
        ])]
    for gname, epochs, jobs in groups:
        ep = 2 if a.quick else epochs
        res = train_students(jobs, data, banks, teachers, ep, dev)
        summary = {}
        for name, accs in res.items():
            mean = sum(accs) / len(accs)
            sd = math.sqrt(sum((x - mean) ** 2 for x in accs) / (len(accs) - 1))
            summary[name] = {"per_replicate": accs, "mean": round(mean, 2), "std": round(sd, 2)}
        results[gname] = summary
        save()
        for name, s in summary.items():
            log(f"{gname} {name:22s} {s['mean']:.2f} ± {s['std']:.2f}  {s['per_replicate']}")
    log("done")


if __name__ == "__main__":
    main()
