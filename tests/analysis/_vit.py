"""Independent references shared by the ViT tests: torch's own math attention switch and the
residual stream h_0..h_2E read by plain hooks (not the library's capture points)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class _Math:
    """torch's math SDPA kernel and MHA's slow path, for the reference derivatives."""

    def __enter__(self) -> None:
        self.was = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        self.k = sdpa_kernel(SDPBackend.MATH)
        self.k.__enter__()

    def __exit__(self, *a) -> None:
        self.k.__exit__(*a)
        torch.backends.mha.set_fastpath_enabled(self.was)


def _stream(model: nn.Module, x: Tensor, encs: list[nn.Module], mids: list[nn.Module]) -> list[Tensor]:
    """h_0 (the first encoder block's input), then after each sublayer: the input of the norm
    before the MLP (attention done) and the block's output (MLP done). Plain hooks."""
    got: list[Tensor] = []
    hs = [encs[0].register_forward_pre_hook(lambda m, a: got.append(a[0].detach().clone()))]
    for enc, mid in zip(encs, mids):
        hs.append(mid.register_forward_pre_hook(lambda m, a: got.append(a[0].detach().clone())))
        hs.append(enc.register_forward_hook(lambda m, a, o: got.append(o.detach().clone())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    assert len(got) == 2 * len(encs) + 1
    return got
