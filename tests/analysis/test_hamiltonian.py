"""Tests of resgeom_fast.analysis.hamiltonian (SCIENCE.md section 4, leaky ResNets).

Ground truth: hand-computed 2 x 2 cases, dense float64 formulas with torch.linalg.inv and
independently written forward passes / autograd / finite differences on small random nets, an
exact identity at a stationary point, a net built with a known rank-r bottleneck, and the study's
claim on the 30-3-30 teacher (trained LeakyResNets, a small honest setting).
"""
from __future__ import annotations

import functools
import json
import math

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from resgeom_fast.analysis.hamiltonian import (
    HamiltonianResult, bottleneck_rank, cost_of_identity, hamiltonian, plot_hamiltonian, plot_layer_spectra,
    stable_rank,
)
from resgeom_fast.models import FCResNet, LeakyResNet
from resgeom_fast.models.leaky import step_sizes

D = torch.float64


# --------------------------------------------------------------------------- dense references
def _sig(a: torch.Tensor) -> torch.Tensor:  # a [w, N] -> [w + 1, N]
    return torch.cat([a.clamp_min(0), torch.ones(1, a.shape[1], dtype=a.dtype)], 0)


def _dense_states(model: LeakyResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """A_0..A_L as [w, N], written out from the update rule (independent of model.forward)."""
    w = model.width
    a = torch.zeros(w, x.shape[0], dtype=D)
    a[: x.shape[1]] = x.T
    out = [a]
    for rho, W in zip(model.rho.tolist(), model.weights):
        a = (1 - rho * model.leak) * a + rho * W.detach() @ _sig(a)
        out.append(a)
    return out


def _tail_loss(model: LeakyResNet, l: int, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss as a function of the state A_l [w, N] (layers l+1..L written out)."""
    rhos = model.rho.tolist()
    for i in range(l, model.depth):
        a = (1 - rhos[i] * model.leak) * a + rhos[i] * model.weights[i].detach() @ _sig(a)
    n = a.shape[1]
    reg = (model.lam / (2 * model.leak)) * sum(r * float(W.detach().pow(2).sum()) for r, W in zip(rhos, model.weights))
    return (y.T - a[: model.out_dim]).pow(2).sum() / n + reg


def _dense_quantities(model: LeakyResNet, x: torch.Tensor, y: torch.Tensor, gamma0: float) -> dict[str, torch.Tensor]:
    lt, lam, L = model.leak, model.lam, model.depth
    A = _dense_states(model, x)
    rhos = model.rho.tolist()
    inv = []
    for a in A:
        s = _sig(a)
        K = s.T @ s
        g = gamma0 * float(torch.linalg.eigvalsh(K).max())
        inv.append(torch.linalg.inv(K + g * torch.eye(K.shape[0], dtype=D)))
    B = []
    for l in range(L + 1):
        leaf = A[l].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_tail_loss(model, l, leaf, y), leaf)
        B.append(-grad / lam)
    coi = torch.tensor([float(torch.trace(a @ Ki @ a.T)) for a, Ki in zip(A, inv)], dtype=D)
    ke, hab = [], []
    for l in range(L):
        v = (A[l + 1] - A[l]) / rhos[l]
        ke.append(float(torch.trace(v @ inv[l] @ v.T)) / (2 * lt))
        s = _sig(A[l])
        hab.append(lt / 2 * float((B[l + 1] @ s.T).pow(2).sum()) - lt * float(torch.trace(B[l + 1] @ A[l].T)))
    ke_t = torch.tensor(ke, dtype=D)
    svals = torch.stack([torch.linalg.svdvals(a) for a in A])
    return {"coi": coi, "kinetic": ke_t, "hamiltonian": ke_t - lt / 2 * coi[:L], "hamiltonian_ab": torch.tensor(hab, dtype=D),
            "momenta": B, "singular_values": svals,
            "stable_rank": svals.sum(1) ** 2 / svals.pow(2).sum(1)}


def _random_model(lam: float = 0.1, leak: float = 2.0, steps: str = "irregular", seed: int = 3) -> LeakyResNet:
    m = LeakyResNet(3, 5, 4, 2, leak, steps, lam=lam, seed=seed).to(D)
    with torch.no_grad():  # non-zero biases so that every column of W matters
        g = torch.Generator().manual_seed(seed)
        for W in m.weights:
            W[:, -1] = 0.3 * torch.randn(W.shape[0], generator=g, dtype=D)
    return m


def _xy(n: int = 7, d_in: int = 3, d_out: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=D), torch.randn(n, d_out, generator=g, dtype=D)


# --------------------------------------------------------------------------- constructed cases
def test_hand_computed_zero_weights() -> None:
    """W_l = 0: A_l = (1 - rho Lt)^l A_0, velocity = -Lt A_l, so KE = (Lt/2) COI and H = 0 exactly.
    X = I_2 (w = N = 2): K_0 = I + 11^T (eigenvalues 1, 3), COI_0 = 1/(1+g) + 1/(3+g) with g = 3 gamma0."""
    m = LeakyResNet(2, 2, 2, 2, 1.0, lam=0.5, seed=0).to(D)
    with torch.no_grad():
        for W in m.weights:
            W.zero_()
    X = torch.eye(2, dtype=D)
    Y = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=D)
    gamma0 = 0.01
    r = hamiltonian(m, X, Y, gamma0)
    g0 = 3 * gamma0
    coi0 = 1 / (1 + g0) + 1 / (3 + g0)
    # A_1 = I/2: K_1 = I/4 + 11^T, eigenvalues 1/4 and 9/4.
    g1 = 2.25 * gamma0
    coi1 = 0.25 * (1 / (0.25 + g1) + 1 / (2.25 + g1))
    assert r.gamma[0].item() == pytest.approx(g0, rel=1e-12)
    assert r.gamma[1].item() == pytest.approx(g1, rel=1e-12)
    assert r.coi[0].item() == pytest.approx(coi0, rel=1e-12)
    assert r.coi[1].item() == pytest.approx(coi1, rel=1e-12)
    assert r.kinetic[0].item() == pytest.approx(0.5 * coi0, rel=1e-12)  # (1/(2Lt)) Tr[(K+g)^-1], velocity = -I
    assert r.potential[0].item() == pytest.approx(-0.5 * coi0, rel=1e-12)
    torch.testing.assert_close(r.hamiltonian, torch.zeros(2, dtype=D), atol=1e-13, rtol=0)
    torch.testing.assert_close(r.k_star, torch.zeros(2, dtype=D), atol=1e-13, rtol=0)
    # Momenta: the branch has zero weights, so B_l = (1/2)^(L-l) B_L with B_L = (2/(lam N)) (Y - A_L).
    A2 = 0.25 * torch.eye(2, dtype=D)
    B2 = 2 / (0.5 * 2) * (Y.T - A2)
    B1, A0, A1 = 0.5 * B2, torch.eye(2, dtype=D), 0.5 * torch.eye(2, dtype=D)
    hab = [0.5 * (B1 @ _sig(A0).T).pow(2).sum() - torch.trace(B1 @ A0.T),
           0.5 * (B2 @ _sig(A1).T).pow(2).sum() - torch.trace(B2 @ A1.T)]
    torch.testing.assert_close(r.hamiltonian_ab, torch.stack(hab), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.momentum_norm, torch.stack([0.25 * B2.norm(), B1.norm(), B2.norm()]), rtol=1e-12, atol=0)
    torch.testing.assert_close(r.singular_values, torch.tensor([[1.0, 1.0], [0.5, 0.5], [0.25, 0.25]], dtype=D))
    torch.testing.assert_close(r.stable_rank, torch.full((3,), 2.0, dtype=D))
    torch.testing.assert_close(r.time, torch.tensor([0.0, 0.5, 1.0], dtype=D))


def test_stable_rank_and_cost_of_identity_known() -> None:
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=D))
    a = q[:, :3] @ torch.diag(torch.tensor([2.0, 2.0, 2.0], dtype=D)) @ q[:3, :]  # three equal singular values
    assert stable_rank(a) == pytest.approx(3.0, rel=1e-12)
    assert stable_rank(torch.diag(torch.tensor([1.0, 0.5], dtype=D))) == pytest.approx(1.5 ** 2 / 1.25, rel=1e-12)
    assert math.isnan(stable_rank(torch.zeros(3, 4, dtype=D)))
    # Nonnegative A whose columns (a_n, 1) span R^r x R: COI -> r as gamma0 -> 0 (A is a block of sigma(A)).
    a = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 1.0, 1.0]], dtype=D)
    assert cost_of_identity(a, 1e-10) == pytest.approx(2.0, abs=1e-6)
    # With the ridge: equal to the dense formula with an explicit inverse.
    s = _sig(a)
    K = s.T @ s
    g = 0.1 * float(torch.linalg.eigvalsh(K).max())
    dense = torch.trace(a @ torch.linalg.inv(K + g * torch.eye(4, dtype=D)) @ a.T)
    assert cost_of_identity(a, 0.1) == pytest.approx(float(dense), rel=1e-12)


def _bottleneck_net(r: int = 3, w: int = 8, m: int = 5, depth: int = 8, leak: float = 2.0) -> tuple[LeakyResNet, torch.Tensor]:
    """A net whose states A_1..A_L equal P A_0, P = diag(1_r, 0): the first step projects out all
    but r coordinates, the others hold the state fixed (velocity 0). X >= 0 so ReLU is the identity.
    Coordinates 1..r of X are the indicators of r disjoint blocks of m samples (a further block of
    m samples is 0 there): A_l has r equal singular values sqrt(m), stable rank r, and COI -> r."""
    g = torch.Generator().manual_seed(0)
    n = (r + 1) * m
    X = 0.5 + torch.rand(n, w, generator=g, dtype=D)
    X[:, :r] = 0.0
    for j in range(r):
        X[(j + 1) * m:(j + 2) * m, j] = 1.0
    net = LeakyResNet(w, w, depth, w, leak, lam=0.1, seed=0).to(D)
    rho = 1.0 / depth
    P = torch.diag(torch.cat([torch.ones(r, dtype=D), torch.zeros(w - r, dtype=D)]))
    eye = torch.eye(w, dtype=D)
    with torch.no_grad():
        for l, W in enumerate(net.weights):
            W.zero_()
            W[:, :w] = ((leak - 1 / rho) * (eye - P) + leak * P) if l == 0 else leak * eye
    return net, X


def test_known_bottleneck_gives_rank_r() -> None:
    r, depth, leak = 3, 8, 2.0
    net, X = _bottleneck_net(r=r, depth=depth, leak=leak)
    states = _dense_states(net, X)
    P = torch.diag(torch.tensor([1.0] * r + [0.0] * 5, dtype=D))
    for a in states[1:]:
        torch.testing.assert_close(a, P @ states[0], atol=1e-12, rtol=0)  # the construction holds
    res = hamiltonian(net, X, torch.zeros(X.shape[0], 8, dtype=D), 1e-10)
    assert res.rank[0].item() > r
    assert res.rank[1:].tolist() == [r] * depth
    torch.testing.assert_close(res.stable_rank[1:], torch.full((depth,), float(r), dtype=D), atol=1e-10, rtol=0)
    torch.testing.assert_close(res.kinetic[1:], torch.zeros(depth - 1, dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(res.k_star[1:], torch.full((depth - 1,), float(r), dtype=D), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.coi[1:], torch.full((depth,), float(r), dtype=D), atol=1e-5, rtol=0)
    br = bottleneck_rank(res)
    assert br.rank_middle == r
    assert br.stable_rank_middle == pytest.approx(r, abs=1e-10)
    assert br.k_star_middle == pytest.approx(r, abs=1e-5)
    assert res.summary()["k_star_middle"] == pytest.approx(r, abs=1e-5)
    assert bottleneck_rank(res, rel=1e-3).rank[0].item() == 8
    assert res.middle == [2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- dense ground truth
@pytest.mark.parametrize("steps", ["equidistant", "irregular"])
def test_matches_dense_formulas(steps: str) -> None:
    m = _random_model(steps=steps)
    X, Y = _xy()
    gamma0 = 1e-2
    res = hamiltonian(m, X, Y, gamma0)
    ref = _dense_quantities(m, X, Y, gamma0)
    for key in ("coi", "kinetic", "hamiltonian", "hamiltonian_ab", "singular_values", "stable_rank"):
        torch.testing.assert_close(getattr(res, key), ref[key], rtol=1e-9, atol=1e-11, msg=key)
    torch.testing.assert_close(res.momentum_norm, torch.stack([b.norm() for b in ref["momenta"]]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.potential, -m.leak / 2 * ref["coi"], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(res.k_star, -2 / m.leak * ref["hamiltonian"], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(res.rho, step_sizes(4, steps))
    assert res.lu_fallbacks == 0


def test_momenta_against_finite_differences() -> None:
    """B_l = -(1/lam) dLoss/dA_l: central differences of the model's own loss, perturbing A_l."""
    m = _random_model()
    X, Y = _xy()
    ref = _dense_quantities(m, X, Y, 1e-2)
    A = _dense_states(m, X)
    eps = 1e-6
    for l in (0, 2, 4):
        B = ref["momenta"][l]
        for i, j in ((0, 0), (1, 6), (2, 3)):  # rows 3, 4 of A_0 are the zero padding (a ReLU kink)
            e = torch.zeros_like(A[l])
            e[i, j] = eps
            fd = (_tail_loss(m, l, A[l] + e, Y) - _tail_loss(m, l, A[l] - e, Y)) / (2 * eps)
            assert float(-fd / m.lam) == pytest.approx(float(B[i, j]), rel=1e-6, abs=1e-8)
    # the analysis' own momenta (through the model's forward) agree with the written-out ones
    res = hamiltonian(m, X, Y, 1e-2)
    torch.testing.assert_close(res.hamiltonian_ab, ref["hamiltonian_ab"], rtol=1e-10, atol=1e-12)


@functools.lru_cache(maxsize=None)
def _stationary_net() -> tuple[LeakyResNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    m = LeakyResNet(3, 10, 3, 3, 1.0, lam=1.0, seed=3).to(D)
    X = torch.randn(4, 3, dtype=D)
    Y = torch.randn(4, 3, dtype=D)
    opt = torch.optim.LBFGS(m.parameters(), lr=1, max_iter=2000, max_eval=4000, tolerance_grad=1e-15,
                            tolerance_change=0, history_size=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = m.loss(X, Y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return m, X, Y


def test_stationary_point_kinetic_form_equals_momentum_form() -> None:
    """At a stationary point W_{l+1} = Lt B_{l+1} sigma(A_l)^T, so with K_l invertible and
    gamma0 -> 0, KE_l - (Lt/2) COI_l = H(A_l, B_{l+1}) exactly (the pairing of the module docstring)."""
    m, X, Y = _stationary_net()
    grads = torch.autograd.grad(m.loss(X, Y), list(m.parameters()))
    assert max(float(g.abs().max()) for g in grads) < 1e-7
    for a in _dense_states(m, X)[:-1]:
        s = _sig(a)
        assert float(torch.linalg.eigvalsh(s.T @ s).min()) > 1e-2  # K_l invertible
    res = hamiltonian(m, X, Y, 1e-14)
    torch.testing.assert_close(res.hamiltonian, res.hamiltonian_ab, rtol=1e-6, atol=1e-8)
    # H is nearly constant across layers at the optimum
    assert float(res.hamiltonian.std() / res.hamiltonian.mean().abs()) < 0.05


def test_lam_zero_has_no_momenta_and_float32_model() -> None:
    m = LeakyResNet(3, 5, 4, 2, 2.0, lam=0.0, seed=0).to(D)
    X, Y = _xy()
    res = hamiltonian(m, X, Y)
    assert res.hamiltonian_ab is None and res.momentum_norm is None
    assert "hamiltonian_ab_mean" not in res.summary()
    json.dumps(res.to_dict(), allow_nan=False)
    # a float32 model: inputs in float32, statistics still float64
    m32 = _random_model().float()
    r32 = hamiltonian(m32, X.float(), Y.float())
    r64 = hamiltonian(_random_model(), X, Y)
    assert r32.coi.dtype == D
    torch.testing.assert_close(r32.coi, r64.coi, rtol=1e-3, atol=1e-4)


def test_result_dict_and_plots_use_exported_data(tmp_path) -> None:
    m = _random_model()
    X, Y = _xy()
    res = hamiltonian(m, X, Y)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    res.to_json(tmp_path / "h.json")
    assert json.loads((tmp_path / "h.json").read_text()) == d
    assert set(res.summary()) <= set(d["summary"])
    fig = plot_hamiltonian(res)
    ax_e, ax_k = fig.axes[:2]
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax_e.lines + ax_k.lines}
    assert lines["H = KE - (Lt/2) COI"] == pytest.approx(d["hamiltonian"])
    assert lines["KE"] == pytest.approx(d["kinetic"])
    assert lines["-(Lt/2) COI"] == pytest.approx(d["potential"])
    assert lines["H(A, B)"] == pytest.approx(d["hamiltonian_ab"])
    assert lines["k* = -(2/Lt) H"] == pytest.approx(d["k_star"])
    assert lines["stable rank of A_l"] == pytest.approx(d["stable_rank"])
    fig2 = plot_layer_spectra(res)
    ys = [list(ln.get_ydata()) for ln in fig2.axes[0].lines]
    assert ys == [pytest.approx(row) for row in d["singular_values"]]
    import matplotlib.pyplot as plt

    _, one = plt.subplots()
    fig3 = plot_hamiltonian(res, ax=one)
    assert len(fig3.axes) == 2  # the energies and a twin axis with k*
    plt.close("all")


# --------------------------------------------------------------------------- the study's claim
# Study: teacher 30 -> 3 -> 30 (k* = 3), N = 1000, w = 100, L = 20. Here a smaller setting:
# N = 200, w = 40, L = 20 (equidistant, rho_l Lt = Lt / 20 <= 0.6), lam = 5e-3, float64, one thread.
# Protocol: continuation in Lt. Lt = 2 from the default init (800 full-batch Adam steps, lr 5e-3,
# cosine to 0); each larger Lt in (4, 8, 12) starts from the previous net's weights (a new
# LeakyResNet with the larger leak + load_state_dict, which re-derives the skips 1 - rho_l Lt) and
# trains 300 Adam steps (lr 2e-3, cosine); every stage ends with 200 L-BFGS iterations (strong
# Wolfe, max_eval 250, full batch, the model's own loss). Without the continuation the default init
# decays like e^-Lt and training from scratch collapses to the zero net for Lt >= 5.
# Measured (one thread; k* = median over the middle layers 5..15 of -(2/Lt) H):
#   Lt   k*      spread of H over layers 5..14 / over 0..19   data loss   |grad|
#    2  -8.32     0.17 / 0.37                                  0.017       3e-4
#    4   1.72     0.18 / 6.6                                   0.004       4e-4
#    8   2.92     0.058 / 0.87                                 0.002       8e-4
#   12   2.93     0.043 / 0.51                                 0.002       7e-4
# (spread = std(H) / |mean(H)|; the large whole-net spreads come from the first and last steps,
# where the states move fast and forward Euler with rho Lt up to 0.6 is coarse). -(2/Lt) H rises to
# about 2.9 at Lt = 8 and stays there at Lt = 12 (with lam = 3e-3: 2.92 and 2.89; with L = 10 and
# lam = 1e-2 it saturates lower, at 2.6, and Lt = 4 from scratch as before gives 1.9). The middle
# states have 4 large singular values (3 teacher directions + the mean direction; the 5th is ~100x
# smaller at Lt = 12), 3 after centering. The target Y itself has rank 3 (the teacher's last layer is
# linear), so the last layers are rank 3 whatever the net does; the claim is about the middle layers.
# Not a stationary point: |grad| ~ 1e-3 (L-BFGS crawls) and H(A, B) / H is 0.9..1.2 in the mean.
# Longer training (1500 / 800 Adam, 600 L-BFGS) does not move it closer: 2.88, 2.80 at Lt = 8, 12, and
# Lt = 16 then drops a teacher direction (the penalty grows with Lt at fixed lam). Two threads: 2.92, 2.91.
CLAIM_LEAKS = (2.0, 4.0, 8.0, 12.0)
CLAIM_DEPTH, CLAIM_LAM = 20, 5e-3


@functools.lru_cache(maxsize=None)
def _teacher_xy() -> tuple[torch.Tensor, torch.Tensor]:
    from resgeom_fast.data import teacher

    return teacher((30, 3, 30), n=200, seed=0, dtype=D).tensors("train")


def _adam(m: LeakyResNet, X: torch.Tensor, Y: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        m.loss(X, Y).backward()
        opt.step()
        sched.step()


def _lbfgs(m: LeakyResNet, X: torch.Tensor, Y: torch.Tensor, iters: int) -> None:
    opt = torch.optim.LBFGS(m.parameters(), lr=1, max_iter=iters, max_eval=iters + iters // 4, tolerance_grad=1e-12,
                            tolerance_change=0, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = m.loss(X, Y)
        loss.backward()
        return loss

    opt.step(closure)


@functools.lru_cache(maxsize=None)
def _continuation() -> dict[float, LeakyResNet]:
    """LeakyResNets trained on the teacher at each Lt of CLAIM_LEAKS, warm-started in Lt."""
    X, Y = _teacher_xy()
    nets: dict[float, LeakyResNet] = {}
    prev = None
    for lt in CLAIM_LEAKS:
        m = LeakyResNet(30, 40, CLAIM_DEPTH, 30, lt, lam=CLAIM_LAM, seed=0).to(D)
        if prev is None:
            _adam(m, X, Y, 800, 5e-3)
        else:
            m.load_state_dict(prev.state_dict())
            assert m.blocks[0].skip.factor == pytest.approx(1 - lt / CLAIM_DEPTH)  # the new leak is in force
            _adam(m, X, Y, 300, 2e-3)
        _lbfgs(m, X, Y, 200)
        nets[lt] = prev = m
    return nets


@functools.lru_cache(maxsize=None)
def _claim_results() -> dict[float, HamiltonianResult]:
    X, Y = _teacher_xy()
    return {lt: hamiltonian(m, X, Y) for lt, m in _continuation().items()}


def _mid_spread(res: HamiltonianResult) -> float:
    h = res.hamiltonian[[l for l in res.middle if l < res.depth]]
    return float(h.std(unbiased=False) / h.mean().abs())


def test_teacher_claim_k_star_approaches_bottleneck_rank() -> None:
    X, Y = _teacher_xy()
    res = _claim_results()
    k = {lt: r.summary()["k_star_middle"] for lt, r in res.items()}
    assert k[2.0] < k[4.0] < k[8.0], k  # -(2/Lt) H rises with Lt ...
    assert abs(k[2.0] - 3) > abs(k[4.0] - 3) > abs(k[8.0] - 3), k  # ... towards k* = 3
    assert abs(k[8.0] - 3.0) < 0.25, k  # measured 2.92
    assert abs(k[12.0] - 3.0) < 0.25, k  # measured 2.93
    for lt in (8.0, 12.0):
        with torch.no_grad():
            assert float(_continuation()[lt].data_loss(_continuation()[lt](X), Y)) < 0.02  # the teacher is fitted
        # -(2/Lt) H <= COI (KE >= 0); here COI is still above 3 in the middle
        assert res[lt].summary()["coi_middle"] >= k[lt]


def test_teacher_claim_hamiltonian_nearly_constant() -> None:
    res = _claim_results()
    spread = {lt: _mid_spread(r) for lt, r in res.items()}
    # over the middle layers: 0.058 at Lt = 8, 0.043 at Lt = 12 (0.17-0.18 at Lt = 2, 4)
    assert spread[8.0] < 0.1 and spread[12.0] < 0.1, spread
    assert spread[12.0] < spread[4.0] and spread[8.0] < spread[4.0], spread
    # over all layers the first and last steps dominate (0.37, 6.6, 0.87, 0.51 at Lt = 2, 4, 8, 12;
    # at Lt = 4 mean H is near 0); from Lt = 8 to 12 the whole-net spread shrinks too
    whole = {lt: r.summary()["hamiltonian_rel_spread"] for lt, r in res.items()}
    assert whole[8.0] > whole[12.0], whole
    assert whole[12.0] < 0.8, whole


def test_teacher_claim_middle_layers_have_three_large_singular_values() -> None:
    X, Y = _teacher_xy()
    res = _claim_results()[12.0]
    m = _continuation()[12.0]
    mid = res.middle
    assert mid == list(range(5, 16))
    # uncentered A_l: 3 directions + the mean direction (4 singular values above 0.1 x the largest)
    assert res.rank[mid].tolist() == [4] * len(mid)
    sv = res.singular_values
    assert bool((sv[mid, 3] > 20 * sv[mid, 4]).all()), sv[mid, :6]  # measured s_4 / s_5 = 37..210 over l = 5..15
    # centered states: 3 large singular values and a wide gap after the 3rd
    with torch.no_grad():
        _, hs = m(X, return_hidden=True)
    gaps = []
    for l in mid:
        s = torch.linalg.svdvals(hs[l] - hs[l].mean(0))
        gaps.append(float(s[2] / s[3]))
    assert min(gaps) > 10 and gaps[-1] > gaps[0], gaps  # measured s_3 / s_4 = 18, 37, 49, ..., 326 at l = 5..15
    # the first layers are not in the bottleneck; at Lt = 2 the middle still carries many directions
    assert res.rank[0].item() > 10
    assert _claim_results()[2.0].stable_rank[mid].min() > res.stable_rank[mid].max()  # 6.9..9.5 vs 3.0..3.2


# --------------------------------------------------------------------------- input checks
def test_rejects_non_leaky_model() -> None:
    X, Y = _xy()
    with pytest.raises(TypeError, match="hamiltonian: expected leaky_model"):
        hamiltonian(FCResNet(3, 5, 2, 2).to(D), X, Y)


def test_rejects_zero_leak() -> None:
    X, Y = _xy()
    with pytest.raises(ValueError, match="leak"):
        hamiltonian(LeakyResNet(3, 5, 4, 2, 0.0).to(D), X, Y)


@pytest.mark.parametrize("gamma0", [0.0, -1e-3, float("nan")])
def test_rejects_bad_gamma0(gamma0: float) -> None:
    X, Y = _xy()
    with pytest.raises(ValueError, match="gamma0"):
        hamiltonian(_random_model(), X, Y, gamma0)


def test_rejects_bad_tol() -> None:
    X, Y = _xy()
    with pytest.raises(ValueError, match="tol"):
        hamiltonian(_random_model(), X, Y, tol=1.5)


def test_rejects_row_mismatch() -> None:
    X, Y = _xy()
    with pytest.raises(ValueError, match="expected Y with 7 rows"):
        hamiltonian(_random_model(), X, Y[:5])


def test_rejects_wrong_feature_dim() -> None:
    X, Y = _xy()
    with pytest.raises(ValueError, match=r"expected X of shape \[N, 3\]"):
        hamiltonian(_random_model(), X[:, :2], Y)


def test_rejects_wrong_dtype() -> None:
    X, Y = _xy()
    with pytest.raises(ValueError, match="dtype"):
        hamiltonian(_random_model(), X.float(), Y)


def test_rejects_non_tensor() -> None:
    _, Y = _xy()
    with pytest.raises(TypeError, match="expected X a tensor"):
        hamiltonian(_random_model(), [[0.0, 1.0, 2.0]], Y)


def test_bottleneck_rank_rejects_bad_input() -> None:
    res = hamiltonian(_random_model(), *_xy())
    with pytest.raises(TypeError, match="bottleneck_rank"):
        bottleneck_rank({"rank": 3})
    with pytest.raises(ValueError, match="rel"):
        bottleneck_rank(res, rel=0.0)
    assert isinstance(res, HamiltonianResult)


# --------------------------------------------------------------------------- non-finite values named
def test_nonfinite_weight_and_targets_named() -> None:
    """Before: a NaN weight ended in torch's "linalg.svd: ... failed to converge", a NaN target gave
    hamiltonian_ab = nan silently; now NonFiniteError names the parameter / argument."""
    from resgeom_fast.linalg import NonFiniteError

    X = torch.randn(10, 3, dtype=D, generator=torch.Generator().manual_seed(0))
    Y = torch.randn(10, 2, dtype=D, generator=torch.Generator().manual_seed(1))
    m = LeakyResNet(3, 5, 4, 2, 1.0, lam=0.1, seed=0).to(D)
    with torch.no_grad():
        m.blocks[1].branch.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"hamiltonian: expected finite model parameter 'blocks\.1\.branch\.weight'"):
        hamiltonian(m, X, Y)
    m = LeakyResNet(3, 5, 4, 2, 1.0, lam=0.1, seed=0).to(D)
    Yn = Y.clone()
    Yn[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"hamiltonian: expected finite Y, got 1 NaN"):
        hamiltonian(m, X, Yn)
    Xi = X.clone()
    Xi[2, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"hamiltonian: expected finite X, got 0 NaN and 1 inf"):
        hamiltonian(m, Xi, Y)
