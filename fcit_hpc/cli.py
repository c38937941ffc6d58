"""The ``fcit`` command: run / bench (more subcommands plug in here)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fcit_hpc.errors import ConfigError, FcitError


def _setup_env() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_run(args, comm) -> int:
    from fcit_hpc.config import config_from_yaml_text, load_config, to_yaml
    from fcit_hpc.errors import ConfigError, StateError
    from fcit_hpc.fed.loop import run_federated
    from fcit_hpc.state.schema import STATE_FILE, read_state

    state = None
    if args.resume:
        run_dir = Path(args.resume)
        if args.config or args.overrides:
            raise ConfigError(
                "--resume RUN_DIR takes the config stored in RUN_DIR/state.h5; "
                "give no CONFIG or overrides"
            )
        st = read_state(run_dir)  # every rank checks the file, so all fail alike
        try:
            cfg = config_from_yaml_text(st.config_yaml)
        except ConfigError as e:
            raise StateError(f"{run_dir / STATE_FILE}: stored config is invalid: {e}") from None
        state = st if comm.is_root else None
    else:
        if not args.config:
            raise ConfigError("fcit run: give CONFIG or --resume RUN_DIR")
        overrides = list(args.overrides)
        if args.out:
            overrides.append(f"out_dir={args.out}")
        cfg = load_config(args.config, overrides)
        run_dir = Path(cfg.out_dir)
        if (run_dir / STATE_FILE).exists():
            raise StateError(
                f"{run_dir / STATE_FILE}: a run already exists here; use "
                f"`fcit run --resume {run_dir}` or another --out"
            )
        comm.barrier()
        if comm.is_root:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
    st = run_federated(cfg, comm, run_dir, state)
    if comm.is_root and st is not None:
        _print_summary(st, run_dir)
    return 0


def _print_summary(st, run_dir: Path) -> None:
    import numpy as np

    acc = st.accuracy
    if not np.isnan(acc[-1]).all():
        print(
            f"final accuracy per task: {np.round(acc[-1], 1).tolist()}  "
            f"mean {np.nanmean(acc[-1]):.2f}"
        )
    print(f"subspaces: {st.num_subspaces}  state: {run_dir / 'state.h5'}")


def cmd_export(args) -> int:
    import numpy as np

    from fcit_hpc.config import config_from_yaml_text
    from fcit_hpc.model.export import export_adapters
    from fcit_hpc.state.schema import read_state

    st = read_state(args.run_dir)
    cfg = config_from_yaml_text(st.config_yaml)
    alpha = None
    if args.alpha:
        try:
            alpha = np.array([float(x) for x in args.alpha.split(",")], np.float32)
        except ValueError:
            raise ConfigError(
                f"--alpha: expected comma-separated numbers, got {args.alpha!r}"
            ) from None
    out = Path(args.out) if args.out else Path(args.run_dir) / "adapters"
    try:
        dirs = export_adapters(cfg, st, out, alpha)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for d in dirs:
        print(d)
    return 0


def cmd_bench(args, comm) -> int:
    if args.what == "rounds":
        from fcit_hpc.bench import bench_rounds

        return bench_rounds(args)
    from kernels.bench import main as bench_kernels

    return bench_kernels(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fcit",
        description="Federated Continual Instruction Tuning simulator (MPI, DeepSpeed, HDF5)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a config (under mpiexec for several ranks)")
    r.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG [key.sub=value ...]",
        help="YAML config, then dotted overrides",
    )
    r.add_argument("--out", help="run directory (overrides out_dir)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    b = sub.add_parser("bench", help="benchmarks: round wall time at 1 vs 2 ranks; kernels")
    b.add_argument("what", choices=["rounds", "kernels"])
    b.add_argument("--quick", action="store_true")
    b.add_argument("--json", help="write results as JSON to this file")
    b.add_argument("--config", default=None, help="config for `bench rounds`")
    e = sub.add_parser("export", help="export a run's subspaces as PEFT LoRA adapters")
    e.add_argument("run_dir")
    e.add_argument("--out", help="directory (default RUN_DIR/adapters)")
    e.add_argument("--alpha", help="comma-separated SSA weights: also write the merged adapter")
    return p


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    args, extra = build_parser().parse_known_args(argv)
    if args.cmd == "run":
        items = list(args.items) + extra
        unknown = [x for x in items if x.startswith("-")]
        if unknown:
            build_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
        args.config = items[0] if items and "=" not in items[0] else None
        args.overrides = items[1:] if args.config else items
    elif extra:
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    from fcit_hpc.fed.comm import make_comm

    comm = make_comm() if args.cmd == "run" else None
    level = logging.INFO if comm is None or comm.is_root else logging.WARNING
    rank = comm.rank if comm is not None else 0
    logging.basicConfig(level=level, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    try:
        if args.cmd == "run":
            code = cmd_run(args, comm)
        elif args.cmd == "export":
            code = cmd_export(args)
        else:
            code = cmd_bench(args, comm)
    except FcitError as e:
        if comm is None or comm.is_root or comm.size == 1:
            print(f"fcit: error: {e}", file=sys.stderr)
        _finish(comm, e.exit_code)
        return e.exit_code
    except BaseException:
        import traceback

        traceback.print_exc()
        _finish(comm, 1, abort=True)
        return 1
    return code


def _finish(comm, code: int, abort: bool = False) -> None:
    """A failing rank in a multi-rank job takes the whole job down instead of leaving it hanging."""
    if comm is not None and comm.size > 1:
        if abort:
            comm.abort(code)
        # an input error is raised on every rank alike: exit without a collective
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
