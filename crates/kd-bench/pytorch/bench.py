"""PyTorch's side of `just bench --pytorch`: the same measurements as kd-bench, on the same data,
with the same models (docs/reference/models.md), so the two are compared side by side in one run.

    python bench.py --data DIR --only NAME [--teacher googlenet-bn] [--threads 2] [--reps 9]
                    [--batches 5] [--layout nchw|channels-last]

Prints one JSON object: the measurement's name, the layout, images per repetition and the seconds
of every repetition (after one warm-up), as kd-bench does for its own.

Measurements: `teacher-step` (forward of all heads, the seed's loss CE + 0.3 aux CEs, backward,
Adam; batch 128), `precompute` (eval forward of all heads, batch 256), `student-kd-step` (student
forward, Hinton KD against cached teacher logits, backward, Adam; batch 128), `matmul-2048` (a
2048×2048 f32 matrix product; its "images" are products, the machine's matrix-product limit).

`teacher-epoch` is what `kd-teacher --epochs 1` does, as a PyTorch user would write it: hold out
`--val-size` of the (first `--train-limit`) training images, one shuffled epoch over the rest with
random crop (padding 2) and horizontal flip, batches of `--batch-size`, cosine learning rate; then
the validation and test accuracies (batch 256) and the weights saved. It runs once (no warm-up,
`--reps` ignored): `kd-bench --epoch` times the whole process, as it times ours.

`pipeline` is what `kd-experiment pipeline` does (`just pipeline`), with the pipeline file's
values as flags (`--teacher-epochs`, `--student-lr`, ...): the teacher trained for its epochs (the
validation accuracy after each, the best epoch kept, then its test accuracy), the logits of all
its heads for every training image saved (torch.save: PyTorch's user has no knowledge file to
write), the KD student from the saved logits and the baseline on labels alone (each with its test
accuracy too), then the report's work (the test accuracy of the three, after a warm-up batch). No
ONNX export: kd-bench shows ours apart. It prints every stage's seconds and the test accuracies;
`kd-bench --whole-pipeline` times the process.
"""

import argparse
import copy
import gzip
import json
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


class BasicConv(nn.Module):
    """Conv + ReLU, or conv without bias + BatchNorm (eps 0.001) + ReLU."""

    def __init__(self, cin, cout, k, s=1, p=0, bn=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, p, bias=not bn)
        self.bn = nn.BatchNorm2d(cout, eps=0.001) if bn else None

    def forward(self, x):
        x = self.conv(x)
        return F.relu(self.bn(x) if self.bn is not None else x)


class Inception(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pp, bn):
        super().__init__()
        self.b1 = BasicConv(cin, c1, 1, bn=bn)
        self.b2 = nn.Sequential(BasicConv(cin, c3r, 1, bn=bn), BasicConv(c3r, c3, 3, p=1, bn=bn))
        self.b3 = nn.Sequential(BasicConv(cin, c5r, 1, bn=bn), BasicConv(c5r, c5, 5, p=2, bn=bn))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), BasicConv(cin, pp, 1, bn=bn))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class Aux(nn.Module):
    def __init__(self, cin, classes, bn):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 2)
        self.conv = BasicConv(cin, 32, 1, bn=bn)
        self.fc1 = nn.Linear(288, 256)
        self.fc2 = nn.Linear(256, classes)

    def forward(self, x):
        x = torch.flatten(self.conv(self.pool(x)), 1)
        x = F.relu(self.fc1(F.dropout(x, 0.5, self.training)))
        return self.fc2(F.dropout(x, 0.5, self.training))


BLOCKS = [
    (16, 24, 32, 4, 8, 8),
    (32, 32, 48, 8, 24, 16),
    (48, 24, 52, 4, 12, 16),
    (40, 28, 56, 6, 16, 16),
    (32, 32, 64, 6, 16, 16),
    (28, 36, 72, 8, 16, 16),
    (64, 40, 80, 8, 32, 32),
    (64, 40, 80, 8, 32, 32),
    (96, 48, 96, 12, 32, 32),
]


class GoogLeNet(nn.Module):
    """`googlenet` / `googlenet-bn`: the seed's GoogLeNet, channels / 4, 28x28 stem, aux heads."""

    def __init__(self, bn, classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            BasicConv(1, 16, 3, p=1, bn=bn), BasicConv(16, 16, 1, bn=bn), BasicConv(16, 48, 3, p=1, bn=bn)
        )
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        cin, blocks = 48, []
        for c in BLOCKS:
            blocks.append(Inception(cin, *c, bn))
            cin = c[0] + c[2] + c[4] + c[5]
        self.blocks = nn.ModuleList(blocks)
        self.aux1 = Aux(128, classes, bn)
        self.aux2 = Aux(132, classes, bn)
        self.fc = nn.Linear(256, classes)

    def forward(self, x):
        x = self.pool(self.stem(x))
        aux = []
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i in (1, 6):
                x = self.pool(x)
            elif i == 2:
                aux.append(self.aux1(x))
            elif i == 5:
                aux.append(self.aux2(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return [self.fc(F.dropout(x, 0.4, self.training))] + aux


class Student(nn.Module):
    """`student-cnn`: 20,490 parameters."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(F.dropout(torch.flatten(x, 1), 0.4, self.training))


def kd_loss(student, teacher, labels, t=1.0, hard=0.55, soft=0.45):
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True)
    return hard * F.cross_entropy(student, labels) + soft * t * t * kl


def sync(args):
    """A GPU works asynchronously: wait for its work before reading the clock."""
    if args.device != "cpu":
        torch.cuda.synchronize()


def timed_reps(args, step):
    step(0)
    sync(args)
    seconds = []
    for r in range(args.reps):
        t0 = time.perf_counter()
        for b in range(args.batches):
            step(1 + r * args.batches + b)
        sync(args)
        seconds.append(time.perf_counter() - t0)
    return seconds


def crop_flip(x, gen, pad=2):
    """A random crop of each image padded by `pad` (zeros), then a horizontal flip with p = 1/2."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def accuracy(model, xs, ys, fmt, batch=256):
    """The main head's accuracy on `xs`, in eval mode, batches of `batch`."""
    model.eval()
    right = 0
    with torch.no_grad():
        for lo in range(0, len(xs), batch):
            out = model(xs[lo : lo + batch].contiguous(memory_format=fmt))
            right += (heads(out)[0].argmax(1) == ys[lo : lo + batch]).sum().item()
    return right / max(len(xs), 1)


def heads(out):
    """The teacher returns its heads as a list, the student one tensor."""
    return out if isinstance(out, list) else [out]


def fit(model, data, train, val, loss_fn, epochs, batch_size, lr, augment, gen, fmt):
    """Adam with a per-step cosine from `lr` to 0 over shuffled epochs of `train` (crop + flip
    when `augment`), the validation accuracy after every epoch, the best epoch's weights kept —
    what our training stages do."""
    images, labels = data
    opt = torch.optim.Adam(model.parameters(), lr)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    best, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        for rows in train[torch.randperm(len(train), generator=gen)].split(batch_size):
            x = crop_flip(images[rows], gen) if augment else images[rows]
            loss = loss_fn(heads(model(x.contiguous(memory_format=fmt))), rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, images[val], labels[val], fmt)
        if acc > best:
            best, best_state = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return best


def teacher_loss(labels, aux_weight):
    def loss(out, rows):
        y = labels[rows]
        return F.cross_entropy(out[0], y) + aux_weight * sum(F.cross_entropy(o, y) for o in out[1:])

    return loss


def split(a, n):
    """The validation rows and the training rows of `n` images."""
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=gen)
    return order[: a.val_size], order[a.val_size :], gen


def read_test(a):
    images = read_idx(f"{a.data}/t10k-images-idx3-ubyte.gz").float().div(255).sub(0.2860).div(0.3530).unsqueeze(1)
    labels = read_idx(f"{a.data}/t10k-labels-idx1-ubyte.gz").long()
    return images[: a.test_limit], labels[: a.test_limit]


def teacher_epoch(a, images, labels, fmt):
    """One real teacher epoch (see the module's doc); prints the accuracies to stderr."""
    val, train, gen = split(a, len(images))
    model = GoogLeNet(bn=a.teacher == "googlenet-bn").to(memory_format=fmt)
    val_acc = fit(model, (images, labels), train, val, teacher_loss(labels, 0.3), 1, a.batch_size, 1e-3, True, gen, fmt)
    test_acc = accuracy(model, *read_test(a), fmt)
    torch.save(model.state_dict(), f"{a.out}/teacher.pt")
    print(f"teacher epoch: validation {val_acc:.4f}, test {test_acc:.4f}", file=sys.stderr)
    return len(train)


def pipeline(a, images, labels, fmt):
    """What `kd-experiment pipeline` does, as a PyTorch user would write it (see the module's
    doc); returns the seconds of every stage and the test accuracies."""
    stages, acc = [], {}
    clock = [time.perf_counter()]

    def done(name):
        now = time.perf_counter()
        stages.append([name, now - clock[0]])
        clock[0] = now

    val, train, gen = split(a, len(images))
    test = read_test(a)
    teacher = GoogLeNet(bn=a.teacher == "googlenet-bn").to(memory_format=fmt)
    loss = teacher_loss(labels, a.aux_weight)
    fit(teacher, (images, labels), train, val, loss, a.teacher_epochs, a.batch_size, a.teacher_lr, a.teacher_augment, gen, fmt)
    torch.save(teacher.state_dict(), f"{a.out}/teacher.pt")
    # Every training stage of ours ends with its kept model's test accuracy (in its manifest).
    accuracy(teacher, *test, fmt)
    done("teacher")
    teacher.eval()
    with torch.no_grad():
        logits = torch.cat([torch.stack(heads(teacher(images[lo : lo + a.knowledge_batch].contiguous(memory_format=fmt))), 1)
                            for lo in range(0, len(images), a.knowledge_batch)])
    torch.save(logits, f"{a.out}/soft-targets.pt")
    done("precompute")
    cached = torch.load(f"{a.out}/soft-targets.pt")[:, 0]
    t, hard, soft = a.temperature, a.hard_weight, a.soft_weight
    students = {}
    for name, loss in [
        ("student", lambda out, rows: kd_loss(out[0], cached[rows], labels[rows], t, hard, soft)),
        ("baseline", lambda out, rows: F.cross_entropy(out[0], labels[rows])),
    ]:
        students[name] = Student().to(memory_format=fmt)
        fit(students[name], (images, labels), train, val, loss, a.student_epochs, a.student_batch, a.student_lr, a.student_augment, gen, fmt)
        torch.save(students[name].state_dict(), f"{a.out}/{name}.pt")
        accuracy(students[name], *test, fmt)
        done(name)
    for name, model in [("teacher", teacher), *students.items()]:
        accuracy(model, test[0][:256], test[1][:256], fmt)
        acc[name] = accuracy(model, *test, fmt)
    done("report")
    return stages, acc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--only", required=True)
    p.add_argument("--teacher", default="googlenet-bn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--layout", default="nchw", choices=["nchw", "channels-last"])
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the measurements (not the epoch or pipeline runs) compute")
    p.add_argument("--tf32", action="store_true", help="with --device cuda: let cuDNN and cuBLAS use TF32 (PyTorch's default for convolutions); off, fp32 as ours")
    p.add_argument("--val-size", type=int, default=5000, help="teacher-epoch: images held out")
    p.add_argument("--out", default=".", help="teacher-epoch: where the weights go")
    p.add_argument("--batch-size", type=int, default=128, help="teacher-epoch: training batch")
    p.add_argument("--train-limit", type=int, default=None, help="teacher-epoch: first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="teacher-epoch: first N test images")
    for name, kind, default in [
        ("teacher-epochs", int, 30), ("teacher-lr", float, 1e-3), ("teacher-augment", int, 1), ("aux-weight", float, 0.3),
        ("knowledge-batch", int, 256), ("student-epochs", int, 10), ("student-batch", int, 128),
        ("student-lr", float, 8e-3), ("student-augment", int, 0), ("temperature", float, 1.0),
        ("hard-weight", float, 0.55), ("soft-weight", float, 0.45),
    ]:
        p.add_argument(f"--{name}", type=kind, default=default, help="pipeline: the pipeline file's value")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    images = read_idx(f"{a.data}/train-images-idx3-ubyte.gz").float().div(255).sub(0.2860).div(0.3530).unsqueeze(1)
    labels = read_idx(f"{a.data}/train-labels-idx1-ubyte.gz").long()
    dev = torch.device(a.device)
    if a.device.startswith("cuda"):
        # fp32 as ours: PyTorch's convolutions default to TF32 on this GPU generation.
        torch.backends.cudnn.allow_tf32 = a.tf32
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
    if a.only == "matmul-2048":
        m1, m2 = torch.randn(2048, 2048, device=dev), torch.randn(2048, 2048, device=dev)
        seconds = timed_reps(a, lambda i: m1 @ m2)
        print(json.dumps({"name": a.only, "layout": a.layout, "images_per_rep": a.batches, "seconds": seconds}))
        return
    fmt = torch.channels_last if a.layout == "channels-last" else torch.contiguous_format
    if a.only == "teacher-epoch":
        t0 = time.perf_counter()
        n = teacher_epoch(a, images[: a.train_limit], labels[: a.train_limit], fmt)
        print(json.dumps({"name": a.only, "layout": a.layout, "images_per_rep": n, "seconds": [time.perf_counter() - t0]}))
        return
    if a.only == "pipeline":
        t0 = time.perf_counter()
        stages, acc = pipeline(a, images[: a.train_limit], labels[: a.train_limit], fmt)
        print(f"pipeline: test accuracy {acc}", file=sys.stderr)
        print(json.dumps({"name": a.only, "layout": a.layout, "images_per_rep": 0, "seconds": [time.perf_counter() - t0],
                          "stages": stages, "accuracy": acc}))
        return
    bs = 256 if a.only == "precompute" else 128
    # On a GPU the training set is uploaded once and batches are slices of it.
    images, labels = images.to(dev), labels.to(dev)

    def batch(i):
        lo = (i * bs) % (len(images) - bs)
        return images[lo : lo + bs].contiguous(memory_format=fmt), labels[lo : lo + bs]

    if a.only in ("teacher-step", "precompute"):
        model = GoogLeNet(bn=a.teacher == "googlenet-bn").to(dev, memory_format=fmt)
    elif a.only == "student-kd-step":
        model = Student().to(dev, memory_format=fmt)
        cached = torch.randn(len(images), 10, device=dev)
    else:
        raise SystemExit(f"unknown measurement {a.only}")

    if a.only == "precompute":
        model.eval()

        def step(i):
            with torch.no_grad():
                model(batch(i)[0])

    else:
        model.train()
        opt = torch.optim.Adam(model.parameters(), 1e-3)

        def step(i):
            x, y = batch(i)
            out = model(x)
            if a.only == "teacher-step":
                loss = F.cross_entropy(out[0], y) + 0.3 * sum(F.cross_entropy(o, y) for o in out[1:])
            else:
                lo = (i * bs) % (len(images) - bs)
                loss = kd_loss(out, cached[lo : lo + bs], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    seconds = timed_reps(a, step)
    result = {"name": a.only, "layout": a.layout, "images_per_rep": bs * a.batches, "seconds": seconds}
    if a.device.startswith("cuda"):
        result["device"] = torch.cuda.get_device_name()
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
