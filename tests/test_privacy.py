"""Client-level DP (clipping, noise, adaptive clipping, the accountant), secure aggregation
(SecAgg+) and the drop-out knob: against numpy references, formulas, dp-accounting's own
documented values, and whole runs (plain vs SecAgg, world sizes, resume)."""

import json

import numpy as np
import pytest
from scipy import stats

from fcit_hpc.config import load_config
from fcit_hpc.errors import ConfigError
from fcit_hpc.fed import privacy
from fcit_hpc.fed import secagg as sa
from fcit_hpc.fed.dropout import dropped_clients
from fcit_hpc.fed.server.private import PrivateCombine
from fcit_hpc.seeds import derive_seed
from fcit_hpc.state.schema import ClientStatus, comparable_content, read_state, same_content

from .conftest import BIN, ROOT, fcit, mpiexec, smoke_serial

SMOKE = ROOT / "configs" / "smoke.yaml"

# --- the accountant ----------------------------------------------------------------------------


def test_accountant_matches_dp_accountings_documented_values():
    # dp-accounting's rdp_privacy_accountant_test: noise multiplier 4.530877117 "is chosen to
    # obtain exactly (1, 1e-6)-DP" for one Gaussian (q = 1), on its fine grid of orders
    orders = [0.001 * i for i in range(1000, 100000)]
    assert privacy.epsilon(4.530877117, 1.0, 1, 1e-6, orders=orders) == pytest.approx(1.0, abs=1e-6)
    # the default orders give an upper bound, close to it
    eps = privacy.epsilon(4.530877117, 1.0, 1, 1e-6)
    assert 1.0 - 1e-9 <= eps < 1.02
    # composition and subsampling behave as they must
    assert privacy.epsilon(1.0, 0.3, 0, 1e-5) == 0.0
    assert privacy.epsilon(0.0, 0.3, 3, 1e-5) == np.inf
    e2, e4 = (privacy.epsilon(1.0, 0.3, n, 1e-5) for n in (2, 4))
    assert 0 < e2 < e4 < privacy.epsilon(1.0, 1.0, 4, 1e-5)
    assert privacy.epsilon(2.0, 0.3, 4, 1e-5) < e4 < privacy.epsilon(0.5, 0.3, 4, 1e-5)


def test_local_budget_counts_uploads_at_half_the_multiplier():
    b = privacy.Budget("local", 2.0, 0.3, 1e-5)
    assert b.epsilon_after(10, 3) == privacy.epsilon(1.0, 1.0, 3, 1e-5)
    assert np.isnan(privacy.Budget("off", 1.0, 0.3, 1e-5).epsilon_after(4, 4))


# --- clipping and noise ------------------------------------------------------------------------


@pytest.mark.parametrize("bound", [0.1, 1.0, 100.0])
def test_clip_against_numpy(bound):
    rng = np.random.default_rng(0)
    d = rng.normal(size=1000).astype(np.float32)
    got, norm = privacy.clip(d, bound)
    ref = d.astype(np.float64) / max(1.0, np.sqrt((d.astype(np.float64) ** 2).sum()) / bound)
    assert norm == pytest.approx(np.sqrt((d.astype(np.float64) ** 2).sum()), rel=1e-12)
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    assert np.linalg.norm(got.astype(np.float64)) <= bound * (1 + 1e-6)


def test_local_noise_is_seeded_and_has_std_z_times_c():
    d = np.zeros(200_000, np.float32)
    a = privacy.local_noise(d, 1.5, 0.2, (0, 1, 2, 3))
    np.testing.assert_array_equal(a, privacy.local_noise(d, 1.5, 0.2, (0, 1, 2, 3)))
    assert not np.array_equal(a, privacy.local_noise(d, 1.5, 0.2, (0, 1, 2, 4)))
    # sample std of n normals: relative standard error 1/sqrt(2n) = 0.16%; tolerance 1%
    assert a.astype(np.float64).std() == pytest.approx(1.5 * 0.2, rel=0.01)
    assert abs(a.mean()) < 5 * 0.3 / np.sqrt(a.size)


def _cfg(*over):
    return load_config(SMOKE, list(over))


def test_central_noise_on_each_mean_has_std_z_c_over_m():
    cfg = _cfg("privacy.dp=central", "privacy.dp_noise=2.0", "privacy.dp_clip=0.5")
    rng = np.random.default_rng(1)
    got = [(rng.normal(size=100_000).astype(np.float32), 1.0) for _ in range(4)]
    plain = np.mean([v.astype(np.float64) for v, _ in got], axis=0)
    comb = PrivateCombine(
        cfg.privacy,
        seed=cfg.seed,
        stage=1,
        round_=0,
        clients_per_round=cfg.clients_per_round,
        clip=0.5,
        sums=None,
        side_sizes={},
        slots=4,
    )
    out = comb.mean(2, got).astype(np.float64)
    noise = out - plain
    assert noise.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.01)
    # another subspace of the same round gets another stream
    assert not np.array_equal(out, comb.mean(3, got))
    # equal weights under DP, whatever the samples
    assert comb.weight(type("U", (), {"samples": 17})()) == 1.0


def test_adaptive_clipping_follows_andrew_et_al():
    # z_Δ = (z^-2 - (2σ_b)^-2)^-1/2
    assert privacy.delta_multiplier(1.0, 2.0) == pytest.approx((1 - 1 / 16) ** -0.5)
    with pytest.raises(ValueError, match="dp_count_std"):
        privacy.delta_multiplier(1.0, 0.5)
    # noiseless count: C·exp(−η(b̄ − γ)); all unclipped → the bound shrinks, none → it grows
    assert privacy.next_clip(1.0, [1, 1, 1, 1], 0.0, 0.2, quantile=0.5, seed=0) == pytest.approx(
        np.exp(-0.1)
    )
    assert privacy.next_clip(1.0, [0, 0], 0.0, 0.2, quantile=0.5, seed=0) == pytest.approx(
        np.exp(0.1)
    )
    noisy = privacy.next_clip(1.0, [1, 0], 1.0, 0.2, quantile=0.5, seed=7)
    b = (1 + np.random.default_rng(7).normal(0.0, 1.0)) / 2
    assert noisy == pytest.approx(np.exp(-0.2 * (b - 0.5)))
    with pytest.raises(ConfigError, match="privacy.dp_count_std"):
        _cfg("privacy.dp=central", "privacy.dp_adaptive=true", "privacy.dp_count_std=0.4")
    with pytest.raises(ConfigError, match="privacy.dp_adaptive: adaptive clipping needs central"):
        _cfg("privacy.dp=local", "privacy.dp_adaptive=true", "privacy.dp_count_std=2")


def test_dropouts_are_seeded_and_sized():
    trainers = list(range(20))
    a = dropped_clients(0, 1, 2, trainers, share=0.25)
    assert len(a) == 5 and a <= set(trainers)
    assert a == dropped_clients(0, 1, 2, trainers[::-1], share=0.25)
    assert dropped_clients(0, 1, 2, trainers, share=0.0) == set()


# --- secure aggregation ------------------------------------------------------------------------


def _session(members, k, t_frac=0.5, group=3):
    graph = sa.harary_graph(members, k, derive_seed(0, group))
    ms = {u: sa.Member(u, group) for u in members}
    keys = {u: m.public_keys() for u, m in ms.items()}
    for u, m in ms.items():
        for v, blob in m.share_keys(graph[u], keys, sa.threshold(len(graph[u]), t_frac)).items():
            ms[v].receive(u, blob, keys)
    return graph, ms, keys


def test_harary_graph_is_k_regular_and_symmetric():
    members = list(range(3, 23))
    g = sa.harary_graph(members, 6, 5)
    assert all(len(g[u]) == 6 for u in members)
    assert all(u in g[v] for u in members for v in g[u])
    full = sa.harary_graph(members[:5], 0, 5)
    assert all(len(full[u]) == 4 for u in members[:5])


def test_shamir_any_t_shares_rebuild_fewer_do_not():
    secret = bytes(range(32))
    shares = sa.shamir_split(secret, [1, 2, 3, 4, 5], 3)
    pts = list(zip([1, 2, 3, 4, 5], shares, strict=True))
    assert sa.shamir_combine(pts[:3]) == secret == sa.shamir_combine(pts[2:])
    # two points fix a line, not the degree-2 polynomial: another field element
    assert sa.shamir_combine(pts[:2], sa.SHARE_BYTES) != secret.rjust(sa.SHARE_BYTES, b"\0")


def test_a_masked_upload_is_uniform_in_the_ring_whatever_its_value():
    """The server's view of one client's upload: for a constant vector and for another constant,
    its values are uniform on Z_2^64 (KS on y / 2^64, chi-square on the top byte)."""
    members = list(range(8))
    graph, ms, keys = _session(members, 4)
    n = 20_000
    for value in (0.0, 3.5):
        x = sa.encode(np.full(n, value), 32, sa.value_bound(32, 8))
        y = ms[2].masked(x, graph[2], keys)
        assert stats.kstest(y.astype(np.float64) / 2.0**64, "uniform").pvalue > 1e-3
        counts = np.bincount((y >> np.uint64(56)).astype(np.int64), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("k,drop", [(0, set()), (4, {12, 17}), (6, {10, 13, 16})])
def test_unmasked_sum_equals_the_plain_sum_with_dropouts_recovered(k, drop):
    members = list(range(10, 20))
    graph, ms, keys = _session(members, k)
    rng = np.random.default_rng(0)
    xs = {u: rng.normal(size=5000) * 1e-2 for u in members}
    bound = sa.value_bound(32, len(members))
    masked = {
        u: ms[u].masked(sa.encode(xs[u], 32, bound), graph[u], keys)
        for u in members
        if u not in drop
    }
    shares = [s for u in masked for s in ms[u].unmask(drop)]
    total = sa.decode(sa.unmask_sum(3, graph, keys, masked, shares=shares, t_frac=0.5, n=5000), 32)
    ref = np.sum([xs[u] for u in masked], axis=0)
    # each encoded value is off by at most half a step 2^-32
    assert np.abs(total - ref).max() <= len(masked) * 2.0**-33


def test_too_many_dropouts_is_a_clear_error():
    members = list(range(6))
    graph, ms, keys = _session(members, 2)  # each client: 2 neighbours, t = 2 of 3 holders
    drop = {0, *graph[0]}  # a client and both its neighbours: its b / sk1 cannot be rebuilt
    x = sa.encode(np.ones(10), 32, 2.0)
    masked = {u: ms[u].masked(x, graph[u], keys) for u in members if u not in drop}
    shares = [s for u in masked for s in ms[u].unmask(drop)]
    with pytest.raises(sa.SecAggError, match="shares from surviving clients, 2 are needed"):
        sa.unmask_sum(3, graph, keys, masked, shares=shares, t_frac=0.5, n=10)


def test_out_of_range_values_are_refused():
    with pytest.raises(sa.SecAggError, match="does not fit the ring"):
        sa.encode(np.array([1e10]), 32, sa.value_bound(32, 4))


# --- whole runs --------------------------------------------------------------------------------

PRIVATE = [
    "privacy.dp=central",
    "privacy.dp_adaptive=true",
    "privacy.dp_count_std=2.0",
    "privacy.dp_clip=0.05",
    "privacy.secagg=true",
    "privacy.secagg_neighbours=2",
    "federation.dropout=0.34",
    "privacy.token_noise=0.01",
]


def _no_config(content):
    return {k: v for k, v in content.items() if not k.startswith("/@config_yaml")}


@pytest.mark.slow
def test_secagg_run_equals_the_plain_run_to_fixed_point_rounding(serial_run, tmp_path):
    out = smoke_serial(tmp_path / "sec", "privacy.secagg=true")  # as serial_run: a process
    a, b = _no_config(comparable_content(serial_run)), _no_config(comparable_content(out))
    differ = set(same_content(a, b))
    # more bytes travel (keys, shares, uint64 masked vectors); the adapter is within rounding
    assert differ <= {"global/adapter", *(k for k in a if "bytes_" in k)}
    sa_, sb = read_state(serial_run), read_state(out)
    assert (sb.rounds["bytes_sent"] > sa_.rounds["bytes_sent"]).all()
    # per coordinate: |mean − plain mean| ≤ m·2^-33 / Σn, then one float32 rounding of A/B
    diff = np.abs(sa_.adapter.astype(np.float64) - sb.adapter)
    assert diff.max() <= 1e-6 * np.abs(sa_.adapter).max() + 1e-8
    np.testing.assert_array_equal(sa_.accuracy, sb.accuracy)


def _lines(run, kind):
    return [
        {k: v for k, v in json.loads(x).items() if k not in ("phases", "seconds")}
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == kind
    ]


@pytest.fixture(scope="module")
def private_ref(tmp_path_factory):
    """configs/smoke.yaml with DP (central, adaptive clipping), SecAgg+ (k = 2), drop-outs and
    noisy tokens on, run once as a plain process (read only)."""
    return smoke_serial(tmp_path_factory.mktemp("private") / "ref", *PRIVATE)


@pytest.mark.slow
def test_dp_secagg_dropout_records(private_ref):
    st = read_state(private_ref)
    assert (
        st.clients["status"] == ClientStatus.DROPPED
    ).sum() == 4  # one of 3 per round dropped, 4 rounds
    assert np.isfinite(st.privacy_epsilon).all() and st.privacy_epsilon[1] > st.privacy_epsilon[0]
    assert st.privacy_norms.size == 8 and len(set(st.privacy_norms["clip"])) > 1  # adaptive
    rounds = _lines(private_ref, "round")
    assert all(r["dp"]["norms"] and r["dp"]["clip"] > 0 for r in rounds)
    assert [p["epsilon"] for p in _lines(private_ref, "privacy")] == st.privacy_epsilon.tolist()
    # ε is dp-accounting's for the rounds run so far (q = 3 of 10 clients, z = 1)
    assert st.privacy_epsilon[1] == privacy.epsilon(1.0, 0.3, 4, 1e-5)


@pytest.mark.mpi
@pytest.mark.slow
def test_dp_secagg_dropout_three_mpi_ranks_equal_one(private_ref, tmp_path):
    """Real MPI ranks (rank 0 hosting no clients: ranks 1, 2 train): the same state as one."""
    out = tmp_path / "p3"
    over = [*PRIVATE, "federation.server_hosts_clients=false"]
    p = mpiexec(3, str(BIN / "fcit"), "run", str(SMOKE), "--out", str(out), *over)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _no_config(comparable_content(private_ref)), _no_config(comparable_content(out))
    assert same_content(a, b) == []
    assert set(read_state(out).clients["rank"].tolist()) == {1, 2}


@pytest.mark.slow
def test_dp_secagg_dropout_stopped_and_resumed_is_bitwise(private_ref, tmp_path):
    """The same settings, stopped by SIGTERM in stage 1 and resumed: equal to the run never
    stopped, metrics.jsonl's privacy lines too."""
    out = tmp_path / "stopped"
    stop = ["debug.kill_rank=0", "debug.kill_stage=1", "debug.kill_round=0"]
    p = fcit("run", str(SMOKE), "--out", str(out), *PRIVATE, *stop, "debug.kill_signal=TERM")
    assert p.returncode == 75, p.stderr[-3000:]
    assert np.isnan(read_state(out).privacy_epsilon[1])
    p = fcit("run", "--resume", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "privacy: ε =" in p.stderr
    a, b = _no_config(comparable_content(private_ref)), _no_config(comparable_content(out))
    assert same_content(a, b) == []
    assert _lines(out, "privacy") == _lines(private_ref, "privacy")


@pytest.mark.slow
def test_a_run_with_too_many_dropouts_for_secagg_stops_with_a_clear_error(tmp_path):
    """2 of the 3 clients drop out: the survivor's self-mask seed needs 2 of 3 shares and has
    its own only. Exit 2 naming the group, the client and the settings; nothing stored."""
    out = tmp_path / "run"
    p = fcit("run", str(SMOKE), "--out", str(out), "privacy.secagg=true", "federation.dropout=0.67")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "secure aggregation of group 0" in p.stderr
    assert "shares from surviving clients, 2 are needed (too many drop-outs" in p.stderr
    assert not (out / "state.h5").exists()


def test_compressed_deltas_are_refused_with_secure_aggregation():

    with pytest.raises(ConfigError, match=r"compress\.subspace: int8 with privacy\.secagg"):
        load_config(None, ["privacy.secagg=true", "compress.subspace=int8"])
    cfg = load_config(None, ["privacy.secagg=true", "compress.token=int8"])  # tokens travel clear
    assert cfg.compress.token == "int8" and cfg.privacy.secagg


def test_token_noise_script_at_zero_noise_is_the_runs_dko(serial_run, capsys):
    """scripts/token_noise_dko.py replays DKO over the schedule without training (DKO depends on
    the tokens only): at σ_t = 0 it makes the subspaces the real run made, and its grouping
    agrees with itself; noisy tokens print their ε."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tnd", ROOT / "scripts/token_noise_dko.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(ROOT / "configs/smoke.yaml"), "--sigmas", "0", "0.05"]) in (0, None)
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| 0")
    ]
    assert [r[0] for r in rows] == ["0", "0.05"]
    exact, noisy = rows
    assert int(exact[2]) == read_state(serial_run).num_subspaces
    assert exact[4] == "1.00" and exact[1] == "∞"
    assert noisy[1] == f"{privacy.token_epsilon(0.05, 1e-5):,.0f}"
