"""The resnet18 default hessian_spectrum run of issue 15: torchvision resnet18 (all 11.7M
parameters, BatchNorm in eval mode, random weights), 64 random CIFAR-sized images, default
settings, one thread. Prints the wall time, peak RSS and the summary as JSON (the record:
benchmarks/results/resnet18_hessian_spectrum_cpu_20261202.json).

Run: ``python benchmarks/scripts/resnet18_spectrum.py`` (about 1 hour on a 2-core CPU, 16 GiB).
"""
import json
import resource
import time

import torch
import torchvision

from resgeom_fast.analysis.spectrum import hessian_spectrum


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = torchvision.models.resnet18().eval()
    P = sum(p.numel() for p in m.parameters())
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 1000, (64,))
    print("P", P, flush=True)
    t0 = time.time()
    r = hessian_spectrum(m, torch.nn.functional.cross_entropy, (x, y), progress=True)
    out = {"P": P, "wall_s": time.time() - t0,
           "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "summary": r.summary(), "notes": r.notes, "lanczos_steps": r.lanczos_steps,
           "converged": r.converged, "products": r.products}
    print(json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
    main()
