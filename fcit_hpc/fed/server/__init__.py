"""The server room: everything rank 0 decides (plans, DKO, validation of uploads, aggregation
with the strategy's server update, the stage-end merge, state initialisation, the metrics log)."""

from fcit_hpc.fed.server.aggregate import Aggregation, RoundInfo, aggregate_round
from fcit_hpc.fed.server.dko import DkoResult, run_dko
from fcit_hpc.fed.server.plan import plan_round, planned_units, sample_clients
from fcit_hpc.fed.server.run_state import init_state
from fcit_hpc.fed.server.server import Server

__all__ = [
    "Aggregation",
    "DkoResult",
    "RoundInfo",
    "Server",
    "aggregate_round",
    "init_state",
    "plan_round",
    "planned_units",
    "run_dko",
    "sample_clients",
]
