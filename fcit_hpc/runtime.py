"""Where and how a rank computes: its device, dtype, node-local rank and client group.

Made once at start-up (:func:`make_runtime`) from the config's ``train`` section and the launcher's
environment, and handed to model building, the trainers, evaluation and the identity encoders. No
other module decides a device: they take ``runtime.device`` (or the device of a model placed by it).

The launcher's environment is read here only (:func:`launch_info`): Open MPI
(``OMPI_COMM_WORLD_*``), MPICH / Hydra and Intel MPI (``PMI_RANK``, ``PMI_SIZE``,
``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``) and SLURM's ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``, ``SLURM_STEP_TASKS_PER_NODE`` with ``SLURM_NODEID``). A rank's GPU comes from
those and ``CUDA_VISIBLE_DEVICES`` / ``SLURM_GPUS_ON_NODE`` (:func:`gpu_index`: a GPU bound to the
task, or the node-local rank over the node's GPUs; never more ranks per GPU than
``train.ranks_per_gpu``).

Client groups (``train.gpus_per_client = G``): the ranks that host clients are split, in rank order,
into consecutive groups of G; a group trains one client at a time, data-parallel over its G devices,
and only its first rank (the leader) exchanges with the server. Every rank computes the same split
from (world size, G, whether rank 0 hosts clients), so no message is needed to agree on it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass

from fcit_hpc.errors import ConfigError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher says about this process (defaults: a plain process, world of one)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    _: KW_ONLY
    launcher: str = "none"  # openmpi | mpich | slurm | none


def _tasks_on_node(spec: str, node: int) -> int:
    """Tasks of node ``node`` from SLURM's compressed list, e.g. ``2(x3),1`` → 2, 2, 2, 1."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ValueError(f"SLURM tasks-per-node list {spec!r} is not understood")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node < len(counts):
        raise ValueError(f"SLURM node id {node} is not in the tasks-per-node list {spec!r}")
    return counts[node]


def launch_info(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Rank, world size and node-local rank/size from the launcher's variables (first match:
    Open MPI, then MPICH/Hydra, then SLURM; a plain process otherwise)."""
    env = os.environ if env is None else env

    def num(key: str) -> int:
        try:
            return int(env[key])
        except ValueError:
            raise ValueError(f"launcher variable {key}={env[key]!r} is not an integer") from None

    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchInfo(
            num("OMPI_COMM_WORLD_RANK"),
            num("OMPI_COMM_WORLD_SIZE"),
            num("OMPI_COMM_WORLD_LOCAL_RANK"),
            num("OMPI_COMM_WORLD_LOCAL_SIZE"),
            launcher="openmpi",
        )
    if "PMI_RANK" in env and "MPI_LOCALRANKID" in env:
        return LaunchInfo(
            num("PMI_RANK"),
            num("PMI_SIZE"),
            num("MPI_LOCALRANKID"),
            num("MPI_LOCALNRANKS"),
            launcher="mpich",
        )
    if "SLURM_PROCID" in env and "SLURM_LOCALID" in env:
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
        local_size = _tasks_on_node(spec, num("SLURM_NODEID") if "SLURM_NODEID" in env else 0)
        return LaunchInfo(
            num("SLURM_PROCID"),
            num("SLURM_NTASKS") if "SLURM_NTASKS" in env else 1,
            num("SLURM_LOCALID"),
            local_size,
            launcher="slurm",
        )
    return LaunchInfo()


@dataclass(frozen=True)
class ClientGroup:
    """The ranks that train one client together (data-parallel over their devices)."""

    index: int  # 0, 1, ... in rank order
    ranks: tuple[int, ...]  # global ranks, leader first

    @property
    def leader(self) -> int:
        return self.ranks[0]

    @property
    def size(self) -> int:
        return len(self.ranks)


def worker_ranks(world: int, server_hosts_clients: bool) -> list[int]:
    """Ranks that host clients: all of them, or all but rank 0 (never none)."""
    return list(range(world)) if (server_hosts_clients or world == 1) else list(range(1, world))


def client_groups(
    world: int, gpus_per_client: int, server_hosts_clients: bool
) -> list[ClientGroup]:
    """The worker ranks split in rank order into consecutive groups of ``gpus_per_client``."""
    workers = worker_ranks(world, server_hosts_clients)
    g = gpus_per_client
    if len(workers) % g:
        host = "" if server_hosts_clients or world == 1 else " (rank 0 only serves)"
        raise ConfigError(
            f"train.gpus_per_client: {g} does not divide the {len(workers)} ranks that host "
            f"clients{host}; launch a multiple of {g} of them"
        )
    return [ClientGroup(i, tuple(workers[i * g : (i + 1) * g])) for i in range(len(workers) // g)]


@dataclass(frozen=True)
class Runtime:
    """Device, dtype and placement of this rank: the one answer to "where does this run"."""

    device: object  # torch.device
    dtype: object  # torch.dtype of the base weights and of compute
    precision: str  # fp32 | bf16 | fp16
    launch: LaunchInfo
    _: KW_ONLY
    rank: int
    world: int
    group: ClientGroup | None  # None: rank 0 when it only serves
    groups: tuple[ClientGroup, ...]
    gradient_checkpointing: bool = False
    deterministic: bool = False

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_leader(self) -> bool:
        """This rank exchanges with the server for its group (G = 1: every worker rank)."""
        return self.group is not None and self.group.leader == self.rank

    @property
    def leaders(self) -> list[int]:
        """The rank of every group's leader: where the server deals clients."""
        return [g.leader for g in self.groups]

    @property
    def dist_backend(self) -> str:
        """torch.distributed backend of the client group: nccl between GPUs, gloo on the CPU."""
        return "nccl" if self.is_cuda else "gloo"


def _env_int(env: Mapping[str, str], key: str) -> int | None:
    if key not in env:
        return None
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"launcher variable {key}={env[key]!r} is not an integer") from None


def gpu_index(
    launch: LaunchInfo,
    env: Mapping[str, str],
    visible: int,
    gpus_per_client: int = 1,
    *,
    ranks_per_gpu: int = 1,
) -> int:
    """The index, among the ``visible`` CUDA devices this rank's torch sees, of its GPU.

    A pure function of the launcher's variables (``launch``: the node-local rank and the ranks on
    the node, from ``SLURM_LOCALID`` or ``OMPI_COMM_WORLD_LOCAL_RANK``; ``env``:
    ``CUDA_VISIBLE_DEVICES``, ``SLURM_GPUS_ON_NODE``) and the device count:

    - *bound*: the launcher gave each task its own GPU (``srun --gpus-per-task=1`` or a
      ``--gpu-bind``, which set ``CUDA_VISIBLE_DEVICES`` per task): the rank sees fewer GPUs than
      the node has for the job (``SLURM_GPUS_ON_NODE``), or one while its node runs several
      ranks; it uses device 0. A task bound to several GPUs is refused: one rank drives one GPU
      (G GPUs per client are G ranks, ``train.gpus_per_client``).
    - otherwise every rank of the node sees the node's GPUs (``mpirun``, ``srun`` without
      binding): GPU = node-local rank modulo their number.

    Either way the node's ranks may not exceed its GPUs times ``ranks_per_gpu``
    (``train.ranks_per_gpu``), and the members of a client group need a GPU each (NCCL): a
    ConfigError names the counts, the variables and the fix."""
    cvd = env.get("CUDA_VISIBLE_DEVICES", "<unset>")
    seen = f"CUDA_VISIBLE_DEVICES={cvd!r}"
    if visible == 0:
        raise ConfigError(
            f"train.device: 'cuda' was asked for but torch sees no CUDA device ({seen})"
        )
    on_node = _env_int(env, "SLURM_GPUS_ON_NODE")  # the step's GPUs on this node (srun)
    if on_node is not None:
        seen += f", SLURM_GPUS_ON_NODE={on_node}"
    asked = [k for k in ("SLURM_GPUS_PER_TASK", "SLURM_GPU_BIND") if k in env]
    seen += "".join(f", {k}={env[k]!r}" for k in asked)
    if "CUDA_VISIBLE_DEVICES" not in env:
        per_task = False
    elif on_node is not None:
        per_task = visible < on_node
    else:  # no node count: a single GPU per task that srun was asked to bind
        per_task = visible == 1 and launch.local_size > 1 and bool(asked)
    if per_task and visible > 1:
        raise ConfigError(
            f"train.gpus_per_client: this rank was given {visible} GPUs of its own ({seen}); a "
            "rank drives one GPU: launch one task per GPU (srun --gpus-per-task=1) and set "
            "train.gpus_per_client = G for G GPUs per client"
        )
    if per_task:  # each task its own GPU; the node has as many as the step gave it
        gpus = on_node if on_node is not None else launch.local_size
    else:  # every rank sees the node's GPUs (of the allocation, when SLURM says how many)
        gpus = min(visible, on_node) if on_node is not None else visible
    share = 1 if gpus_per_client > 1 else ranks_per_gpu
    if launch.local_size > gpus * share:
        need = -(-launch.local_size // gpus)
        if gpus_per_client > 1:
            what = f"train.gpus_per_client: {gpus_per_client} GPUs per client"
            fix = f"a client group's members need a GPU each: start at most {gpus} ranks per node"
        else:
            what = f"train.ranks_per_gpu: {ranks_per_gpu}"
            fix = (
                f"start at most {gpus * share} ranks per node, or allow {need} ranks per GPU "
                f"(train.ranks_per_gpu={need})"
            )
        raise ConfigError(
            f"{what}: this node runs {launch.local_size} ranks ({launch.launcher} launch) on "
            f"{gpus} GPUs ({seen}), {need} per GPU; {fix}"
        )
    return 0 if per_task else launch.local_rank % gpus


def _cuda_device(launch: LaunchInfo, train_cfg, visible: int):
    """torch.device of this rank's GPU (:func:`gpu_index` on this process's environment)."""
    import torch

    index = gpu_index(
        launch,
        os.environ,
        visible,
        train_cfg.gpus_per_client,
        ranks_per_gpu=train_cfg.ranks_per_gpu,
    )
    return torch.device("cuda", index)


def make_runtime(
    train_cfg, federation_cfg, rank: int, world: int, *, launch: LaunchInfo | None = None
) -> Runtime:
    """The runtime of this rank from the config's ``train`` section and the launcher's
    environment. Raises ConfigError naming the field when the request cannot be met (CUDA asked
    for where there is none, more ranks on a node than GPUs, G not dividing the ranks)."""
    import torch

    launch = launch_info() if launch is None else launch
    groups = client_groups(world, train_cfg.gpus_per_client, federation_cfg.server_hosts_clients)
    mine = next((g for g in groups if rank in g.ranks), None)
    want = train_cfg.device
    has_cuda = torch.cuda.is_available()
    if want == "cuda" or (want == "auto" and has_cuda):
        device = _cuda_device(launch, train_cfg, torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    dtype = getattr(torch, DTYPES[train_cfg.precision])
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"train.precision: bf16 is not supported by {name}")
    return Runtime(
        device,
        dtype,
        train_cfg.precision,
        launch,
        rank=rank,
        world=world,
        group=mine,
        groups=tuple(groups),
        gradient_checkpointing=train_cfg.gradient_checkpointing,
        deterministic=train_cfg.deterministic,
    )


def apply_runtime(rt: Runtime) -> None:
    """Process-wide settings of the runtime: the current CUDA device, deterministic algorithms
    (cuBLAS needs its workspace variable set before its first call) and DeepSpeed's accelerator."""
    import torch

    os.environ["DS_ACCELERATOR"] = "cuda" if rt.is_cuda else "cpu"
    if rt.is_cuda:
        torch.cuda.set_device(rt.device)
    if rt.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
