"""Ten structured Hessian products of one conv-row model with the heap scope on or off, in this
process: the median time and glibc's heap statistics after the last product (mallinfo2).

Usage: python benchmarks/scripts/heap_ab.py {user_fc,resnet20,resnet18} {on,off_fresh}
(``off_fresh``: RESGEOM_HEAP=0 before the first product, so glibc's own dynamic thresholds run
untouched). Run each arm in its own process, interleaved; REPS (default 8) timed products after
three warm-ups.
"""
import sys, os, time, torch, statistics
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
os.environ.setdefault("RESGEOM_BENCH_CONV", "issue")
from torch import nn
from benchmarks.bench_operators import _conv_model, _probe
from resgeom_fast.operators import hessian
from resgeom_fast.core import heap
torch.set_num_threads(1)
libc = heap._glibc()
m, x, y = _conv_model(sys.argv[1])
op = hessian(m, nn.CrossEntropyLoss(), (x, y), hvp="structured")
V = _probe(m, 10)
mode = sys.argv[2]
os.environ["RESGEOM_HEAP"] = "1" if mode == "on" else "0"
for _ in range(3): op.matmat(V)
ts = []
for _ in range(int(os.environ.get("REPS", "8"))):
    t = time.perf_counter(); op.matmat(V); ts.append(time.perf_counter() - t)
mi = libc.mallinfo2()
print(sys.argv[1], mode, "median %.4f" % statistics.median(ts), "arena %d MiB fordblks %d MiB keepcost %d MiB hblkhd %d MiB" % (mi.arena >> 20, mi.fordblks >> 20, mi.keepcost >> 20, mi.hblkhd >> 20))
