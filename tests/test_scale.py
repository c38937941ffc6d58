"""Many clients (docs/scale.md): 2,000 clients on 1 and 2 real ranks give the same state, the report
says how many clients trained, every record carries each rank's memory, and `fcit bench scale`'s
figures read back from such a run."""

import re

import numpy as np
import pytest

from fcit_hpc.bench_scale import measure
from fcit_hpc.config import load_config
from fcit_hpc.fed.server.plan import sample_clients
from fcit_hpc.state.schema import read_state
from fcit_hpc.timers import run_records

from .conftest import BIN, ROOT, mpiexec, run_ok

CONFIG = str(ROOT / "configs" / "bench_scale.yaml")
OVERRIDES = ("federation.num_clients=2000", "federation.client_selection_frac=0.01")


@pytest.mark.mpi
@pytest.mark.slow
def test_two_thousand_clients_on_one_and_two_ranks(tmp_path):
    one = run_ok("bench_scale.yaml", tmp_path / "p1", *OVERRIDES, "federation.num_rounds=2")
    p = mpiexec(
        2,
        str(BIN / "fcit"),
        "run",
        CONFIG,
        "--out",
        str(tmp_path / "p2"),
        *OVERRIDES,
        "federation.num_rounds=2",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = read_state(one), read_state(tmp_path / "p2")
    assert a.adapter.tobytes() == b.adapter.tobytes()  # world-size invariance at 2,000 clients
    assert a.tokens.tobytes() == b.tokens.tobytes()
    # the clients that trained: every round's sample, drawn here from the seeds (independent of
    # the run's records)
    cfg = load_config(CONFIG, [*OVERRIDES, "federation.num_rounds=2"])
    drawn = np.concatenate(
        [
            sample_clients(cfg.seed, s, r, 2000, k=cfg.clients_per_round)
            for s in (0, 1)
            for r in (0, 1)
        ]
    )
    np.testing.assert_array_equal(np.sort(b.clients["client"]), np.sort(drawn))
    report = (tmp_path / "p2" / "report.md").read_text()
    m = re.search(
        r"clients trained: ([\d,]+) of 2,000 \((\d+) client updates accepted, 0 rejected", report
    )
    assert m and int(m.group(1).replace(",", "")) == len(np.unique(drawn)) and int(m.group(2)) == 80
    # every round record: both ranks' peak and current memory, plausible for a torch process
    for rec in run_records(tmp_path / "p2" / "metrics.jsonl", "round"):
        assert len(rec["peak_rss_mib"]) == len(rec["rss_mib"]) == 2
        assert all(100 < r <= p for r, p in zip(rec["rss_mib"], rec["peak_rss_mib"], strict=True))
        assert "dko" in rec
    got = measure(tmp_path / "p2")
    assert got["sampled"] == 20 and got["rounds"] == 4
    assert 0 < got["dko_share"] < 1 and got["state_kib"] > 0
