"""What a pause between products costs: torchvision resnet18 (64 CIFAR-sized images, BN eval, one
thread), ten Hessian products per call, each call timed with its minor page faults and system time:
the auto-tuner's calls, two calls right after, two after a 3 s pause, one after a PyHessian-style
double backward of the same model (ten single products on a retained graph), one right after.

    python benchmarks/scripts/heap_pause.py [OUT.json]                       # the default trim delay
    RESGEOM_HEAP_TRIM_DELAY_S=1 python benchmarks/scripts/heap_pause.py       # the delay before 2026-12-03
    RESGEOM_HEAP=0 python benchmarks/scripts/heap_pause.py                    # no heap scope (glibc's defaults)

Run from the repository root (it imports the working tree's resgeom_fast). Results of 2026-12-03:
benchmarks/results/heap_pause_cpu_20261203.md."""
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
import torchvision  # noqa: E402

from resgeom_fast.core import heap  # noqa: E402
from resgeom_fast.operators import hessian  # noqa: E402

torch.set_num_threads(1)
CE = torch.nn.CrossEntropyLoss()


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30, 2)


def main(out_path=None) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(64, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(x)
    m.eval()
    ps = [p for p in m.parameters() if p.requires_grad]
    P = sum(p.numel() for p in ps)
    V = torch.randn(P, 10, generator=torch.Generator().manual_seed(7), dtype=torch.float64).float()
    op = hessian(m, CE, (x, y))
    rows = []

    def call(label):
        rss = rss_gib()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        op.matmat(V)
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        row = {"label": label, "s": round(dt, 3), "faults": r1.ru_minflt - r0.ru_minflt,
               "sys_s": round(r1.ru_stime - r0.ru_stime, 3), "usr_s": round(r1.ru_utime - r0.ru_utime, 3),
               "rss_before_gib": rss, "choice": op.hvp_choice(10)}
        print(row, flush=True)
        rows.append(row)

    n = 0
    while op.hvp_choice(10) is None and n < 8:
        call("tune")
        n += 1
    call("right_after")
    call("right_after")
    for _ in range(2):
        time.sleep(3)
        call("after_3s_pause")
    loss = CE(m(x), y)
    g = torch.autograd.grad(loss, ps, create_graph=True)
    for j in range(10):
        vs = [c.reshape(p.shape) for c, p in zip(V[:, j].split([q.numel() for q in ps]), ps)]
        torch.autograd.grad(g, ps, grad_outputs=vs, retain_graph=True)
    del g, loss
    call("after_peer")
    call("right_after")
    res = {"rows": rows, "heap": heap.state(), "RESGEOM_HEAP": os.environ.get("RESGEOM_HEAP"),
           "RESGEOM_HEAP_TRIM_DELAY_S": os.environ.get("RESGEOM_HEAP_TRIM_DELAY_S"),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if out_path:
        with open(out_path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(out_path + ".tmp", out_path)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
