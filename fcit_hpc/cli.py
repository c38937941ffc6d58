"""The ``fcit`` command: run / bench / report / data / export / doctor."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fcit_hpc.errors import ConfigError, FcitError, Preempted, StateError, one_line

if TYPE_CHECKING:
    from fcit_hpc.config import Config
    from fcit_hpc.state.schema import RunState


def _setup_env() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class RunStart:
    """What ``fcit run`` resolved: the config, the run directory, the stored state to continue
    from (None: start afresh) and whether ``config.yaml`` is still to be written."""

    cfg: Config
    run_dir: Path
    state: RunState | None = None
    write_config: bool = True


def _config_difference(stored: str, cfg: Config) -> str | None:
    """The first line in which a stored config differs from ``cfg`` (where the run lives,
    ``out_dir``, is not compared), or None when they agree."""
    from fcit_hpc.config import to_yaml

    def lines(text: str) -> list[str]:
        return [x for x in text.splitlines() if not x.startswith("out_dir:")]

    a, b = lines(stored), lines(to_yaml(cfg))
    for x, y in zip(a + [""] * len(b), b + [""] * len(a), strict=False):
        if x != y:
            return f"stored {x.strip()!r}, given {y.strip()!r}"
    return None


def _config_diff(stored: str, given: str) -> str:
    """A unified diff (``out_dir`` lines dropped) of two resolved configs, '' when they agree."""
    import difflib

    def lines(text: str) -> list[str]:
        return [x for x in text.splitlines() if not x.startswith("out_dir:")]

    a, b = lines(stored), lines(given)
    if a == b:
        return ""
    if len(a) + len(b) > MAX_DIFF_LINES:  # difflib is quadratic: the first difference only
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        i = min(len(a), len(b)) if first is None else first
        x, y = (a[i] if i < len(a) else ""), (b[i] if i < len(b) else "")
        return f"--- state.h5 (stored)\n+++ config.yaml\n-{x}\n+{y}\n(first difference only)"
    diff = difflib.unified_diff(a, b, "state.h5 (stored)", "config.yaml", n=0, lineterm="")
    return "\n".join(x for x in diff if not x.startswith("@@"))


MAX_DIFF_LINES = 2000


def _read_config_text(saved: Path, when_empty: str) -> str:
    """RUN_DIR/config.yaml's text; ConfigError naming it when it cannot be read or is empty
    (what a full disk leaves), the latter with ``when_empty``: what to do about it."""
    try:
        text = saved.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{saved}: cannot read the run's config ({one_line(e)})") from None
    if not text.strip():
        raise ConfigError(f"{saved}: empty (a write cut short, e.g. by a full disk); {when_empty}")
    return text


def _saved_config(saved: Path) -> Config:
    """RUN_DIR/config.yaml, refused when empty (what a full disk leaves) or unreadable."""
    from fcit_hpc.config import load_config

    _read_config_text(
        saved,
        "not resuming with the default config: remove it and start afresh with "
        f"`fcit run CONFIG --out {saved.parent}`",
    )
    try:
        return load_config(saved)
    except ConfigError as e:  # a field's error: say which file it is in
        if str(saved) in str(e):
            raise
        raise ConfigError(f"{saved}: {e}") from None


def stored_config(st: RunState, state_file: Path) -> Config:
    """The config a state file holds; StateError naming the file when it is invalid."""
    from fcit_hpc.config import config_from_yaml_text

    try:
        return config_from_yaml_text(st.config_yaml)
    except ConfigError as e:
        raise StateError(f"{state_file}: stored config is invalid: {e}") from None


def _resume_config(st: RunState, saved: Path, accept: bool) -> tuple[Config, bool]:
    """The config a resume continues with (stored in ``st``) and whether config.yaml is to be
    rewritten from it (missing). A config.yaml that is empty, unparsable or differs from the
    stored config is refused with a diff; ``accept`` (``--accept-config``) takes its settings."""
    from fcit_hpc.config import to_yaml

    state_file = saved.parent / "state.h5"
    stored = stored_config(st, state_file)
    if not saved.exists():
        return stored, True
    if not saved.is_file():
        raise ConfigError(f"{saved}: not a file")
    _read_config_text(
        saved,
        f"while {state_file} holds the run's config: remove {saved} to resume with the stored "
        "one (it is rewritten)",
    )
    try:
        given = _saved_config(saved)
    except ConfigError as e:
        raise ConfigError(
            f"{e} -- {state_file} holds the run's config: remove {saved} to resume with it"
        ) from None
    diff = _config_diff(to_yaml(stored), to_yaml(given))
    if not diff:
        return stored, False
    if accept:
        logging.getLogger("fcit").warning(
            "%s: resuming with this file's settings (--accept-config), not the stored ones:\n%s",
            saved,
            diff,
        )
        st.config_yaml = to_yaml(given)
        return given, False
    raise ConfigError(
        f"{saved}: differs from the config stored in {state_file}, which the run was started "
        f"with:\n{diff}\nrestore the file (or remove it: it is rewritten from the state), or "
        "resume with `--accept-config` to continue with the file's settings deliberately"
    )


def _stored_run(run_dir: Path, cfg: Config | None, accept: bool = False) -> RunStart | None:
    """The run stored in ``run_dir``: from its state file, or, when it stopped before its first
    round was stored, afresh from its ``config.yaml``; None when there is neither. ``cfg``: the
    config given on the command line, which the stored one must equal (``--continue``); None:
    ``--resume``, which checks config.yaml against the stored config (``accept``:
    ``--accept-config``)."""
    from fcit_hpc.state.schema import STATE_FILE, read_state

    state_file, saved = run_dir / STATE_FILE, run_dir / "config.yaml"
    if state_file.exists():
        st = read_state(run_dir)  # every rank checks the file, so all fail alike
        if cfg is None:
            stored, rewrite = _resume_config(st, saved, accept)
            return RunStart(stored, run_dir, st, write_config=rewrite)
        stored = stored_config(st, state_file)
        if diff := _config_difference(st.config_yaml, cfg):
            raise ConfigError(
                f"{state_file}: holds a run of another config ({diff}); use another --out"
            )
        return RunStart(stored, run_dir, st, write_config=False)
    if saved.is_file():
        if cfg is not None and not saved.read_bytes().strip():
            return None  # --continue: an empty file left by a cut write; the given config starts
        stored = _saved_config(saved)
        if cfg is not None and (diff := _config_difference(saved.read_text(), cfg)):
            raise ConfigError(f"{saved}: holds a run of another config ({diff}); use another --out")
        if not stored.compare:  # a comparison continues its unfinished sub-runs
            logging.getLogger("fcit").info(
                "%s: no state stored yet (stopped before its first round): starting afresh from %s",
                run_dir,
                saved,
            )
        return RunStart(stored, run_dir, write_config=False)
    return None


def resolve_run(args) -> RunStart:
    """The run ``fcit run`` starts or continues (the same on every rank; nothing written)."""
    from fcit_hpc.config import load_config
    from fcit_hpc.state.schema import STATE_FILE

    if args.resume:
        run_dir = Path(args.resume)
        if args.config or args.overrides or args.cont:
            raise ConfigError(
                "--resume RUN_DIR takes the config stored in RUN_DIR; give no CONFIG, overrides "
                "or --continue"
            )
        start = _stored_run(run_dir, None, getattr(args, "accept_config", False))
        if start is None:
            raise StateError(
                f"{run_dir / STATE_FILE}: state file not found (nor a config.yaml to start from)"
            )
        return start
    if getattr(args, "accept_config", False):
        raise ConfigError("--accept-config goes with --resume RUN_DIR only")
    if not args.config:
        raise ConfigError("fcit run: give CONFIG or --resume RUN_DIR")
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    cfg = load_config(args.config, overrides)
    if cfg.model.name == "hf-shape":
        raise ConfigError(
            "model.name: 'hf-shape' (random weights, no tokenizer) is for `fcit bench train` "
            "only; `fcit run` needs embedded, tiny-llava, tiny-llama or hf"
        )
    run_dir = Path(cfg.out_dir)
    if args.cont and (start := _stored_run(run_dir, cfg)) is not None:
        start.cfg = cfg  # the debug section of the command line, not of the stored config
        return start
    if (run_dir / STATE_FILE).exists() and not cfg.compare:
        raise StateError(
            f"{run_dir / STATE_FILE}: a run already exists here; use "
            f"`fcit run --resume {run_dir}`, --continue or another --out"
        )
    return RunStart(cfg, run_dir)


def check_run_scorers(cfg, run_dir: Path) -> None:
    """Every scorer that the datasets of all stages of the run (of every cell of a sweep) need
    is present, or DependencyError naming the dataset and the package."""
    from fcit_hpc.benchmark.scorers import check_scorers

    check_scorers(cfg.benchmark, cfg.eval)
    if cfg.sweep:
        from fcit_hpc.compare import cell_config, sweep_cells

        for name, over in sweep_cells(cfg):
            cell = cell_config(cfg, over, run_dir / name)
            check_scorers(cell.benchmark, cell.eval)


def cmd_run(args, comm) -> int:
    import yaml

    from fcit_hpc.config import to_dict
    from fcit_hpc.fed import preempt
    from fcit_hpc.fed.handshake import check_same_job
    from fcit_hpc.preflight import preflight
    from fcit_hpc.run import run_federated, runtime_for

    start, error = None, None
    try:
        start = resolve_run(args)
        check_run_scorers(start.cfg, start.run_dir)  # before anything is written (exit 2)
    except FcitError as e:
        error = e
    # every rank resolved the same config from the same code, or all stop here (exit 2)
    text = yaml.safe_dump(to_dict(start.cfg), sort_keys=False) if start is not None else None
    check_same_job(comm, text, error)
    if error is not None:
        raise error
    cfg, run_dir = start.cfg, start.run_dir
    _agree(comm, lambda: preflight(cfg, run_dir, start.state is not None))  # nothing written
    runtime = runtime_for(cfg, comm)  # a device or group that cannot be had fails before writes
    comm.barrier()
    created = not run_dir.exists()
    lock = _agree(comm, lambda: _take(start))  # rank 0 owns the directory from here on
    preempt.set_run_dir(run_dir)
    try:
        if comm.is_root and start.write_config:
            _write_config(run_dir, cfg)
        if cfg.sweep:
            from fcit_hpc.compare import run_sweep

            run_sweep(cfg, comm, run_dir)
            return 0
        if cfg.compare:
            from fcit_hpc.compare import run_compare

            run_compare(cfg, comm, run_dir)
            return 0
        state = start.state if comm.is_root else None
        st = run_federated(cfg, comm, run_dir, state, runtime=runtime)
    except FcitError:
        if comm.is_root and start.write_config and start.state is None and not cfg.compare:
            _remove_setup_files(run_dir, created)  # a fresh run that stored nothing
        raise
    finally:
        if lock is not None:
            lock.release()
    if comm.is_root and st is not None:
        _print_summary(st, run_dir)
    return 0


def _agree(comm, fn):
    """Run ``fn`` on rank 0 and broadcast whether it passed: on failure rank 0 raises its error,
    the others an error of the same exit code (rank 0 prints the message). Returns rank 0's
    result (None elsewhere)."""
    import numpy as np

    result, error = None, None
    if comm.is_root:
        try:
            result = fn()
        except FcitError as e:
            error = e
    code = comm.bcast_array(
        np.array([error.exit_code if error else 0], np.int64) if comm.is_root else None
    )
    if error is not None:
        error.rank_local = False  # every rank knows and stops
        raise error
    if int(code[0]):
        e = FcitError("stopped by rank 0")
        e.exit_code = int(code[0])
        raise e
    return result


def _take(start: RunStart):
    """Lock the run directory (rank 0), then check that what was resolved before is still there:
    another run may have stored a state in between."""
    from fcit_hpc.state.lock import acquire
    from fcit_hpc.state.schema import STATE_FILE, read_state

    lock = acquire(start.run_dir)
    try:
        exists = (start.run_dir / STATE_FILE).exists()
        if start.state is None and exists and not start.cfg.compare:
            raise StateError(
                f"{start.run_dir / STATE_FILE}: a run was stored here meanwhile; use "
                f"`fcit run --resume {start.run_dir}` or another --out"
            )
        if start.state is not None:
            config_yaml = start.state.config_yaml  # an --accept-config choice is kept
            start.state = read_state(start.run_dir)  # as the previous owner left it
            start.state.config_yaml = config_yaml
    except BaseException:
        lock.release()
        raise
    return lock


def _write_config(run_dir: Path, cfg: Config) -> None:
    """RUN_DIR/config.yaml, atomically (a temporary file renamed): a full disk leaves no empty
    or partial file."""
    from fcit_hpc.config import to_yaml
    from fcit_hpc.errors import StorageError

    final, tmp = run_dir / "config.yaml", run_dir / ".config.yaml.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(to_yaml(cfg))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"{final}: cannot write the run's config ({one_line(e)})") from None


def _remove_setup_files(run_dir: Path, created: bool) -> None:
    """After an error in the set-up of a fresh run: remove what it wrote (config.yaml; the
    directory when this run made it and holds nothing else but the lock file)."""
    import contextlib

    from fcit_hpc.state.lock import LOCK_FILE
    from fcit_hpc.state.schema import STATE_FILE

    if (run_dir / STATE_FILE).exists():
        return
    with contextlib.suppress(OSError):
        (run_dir / "config.yaml").unlink(missing_ok=True)
        if created and {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            run_dir.rmdir()


def _print_summary(st, run_dir: Path) -> None:
    import numpy as np

    acc = st.accuracy
    if not np.isnan(acc[-1]).all():
        print(
            f"final accuracy per task: {np.round(acc[-1], 1).tolist()}  "
            f"mean {np.nanmean(acc[-1]):.2f}"
        )
    print(f"subspaces: {st.num_subspaces}  state: {run_dir / 'state.h5'}")
    print_phases(run_dir)


def print_phases(run_dir: Path) -> None:
    """The end-of-run phase table (fcit_hpc.timers) of RUN_DIR/metrics.jsonl, on the terminal."""
    from fcit_hpc.timers import eval_share, run_records, table

    records = run_records(run_dir / "metrics.jsonl")
    if records:
        print("where the time went (phase timers, docs/phases.md):")
        print("\n".join(table(records)))
        share = eval_share(run_dir / "metrics.jsonl")
        print(f"evaluation's share of the wall time: {100 * share:.1f}%")


def cmd_export(args) -> int:
    """Check every argument, write the adapters into a temporary folder beside ``--out``, then
    rename it into place (an existing export is replaced only once the new one is complete)."""
    import shutil

    import numpy as np

    from fcit_hpc.errors import StorageError
    from fcit_hpc.methods import make_method
    from fcit_hpc.state.schema import STATE_FILE, read_state

    st = read_state(args.run_dir)
    cfg = stored_config(st, Path(args.run_dir) / STATE_FILE)
    alpha = None
    if args.alpha:
        try:
            alpha = np.array([float(x) for x in args.alpha.split(",")], np.float64)
        except ValueError:
            raise ConfigError(
                f"--alpha: expected comma-separated numbers, got {args.alpha!r}"
            ) from None
        if not np.isfinite(alpha).all() or np.abs(alpha).max() > np.finfo(np.float32).max:
            raise ConfigError(f"--alpha: weights must be finite float32 numbers, got {args.alpha}")
        alpha = alpha.astype(np.float32)
    out = Path(args.out) if args.out else Path(args.run_dir) / "adapters"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file, not a directory")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise StorageError(f"{out}: cannot create the export folder ({one_line(e)})") from None
    try:
        dirs = make_method(cfg.method, cfg.lora).export(cfg.model, st, tmp, alpha)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except ValueError as e:  # an --alpha the run's adapters cannot take, or a state that misfits
        if str(e).startswith("--alpha"):
            raise ConfigError(str(e)) from None
        state_file = Path(args.run_dir) / STATE_FILE
        raise StateError(
            f"{state_file}: does not fit the model of its stored config ({one_line(e)})"
        ) from None
    except OSError as e:
        raise StorageError(f"{out}: cannot write the export ({one_line(e)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for d in dirs:
        print(out / d.relative_to(tmp))
    return 0


def cmd_data(args) -> int:
    from fcit_hpc.benchmark.registry import stage_datasets

    if args.action == "prepare":
        from fcit_hpc.benchmark.layout import prepare

        if args.beta <= 0:
            raise ConfigError(f"--beta: {args.beta} is out of range (must be > 0)")
        stages = stage_datasets(args.setting, args.order)
        if args.datasets:
            keep = set(args.datasets.split(","))
            stages = [[n for n in st if n in keep] for st in stages]  # stage numbers kept
        out = prepare(
            args.raw,
            args.out,
            stages,
            args.setting,
            beta=args.beta,
            num_clients=args.num_clients,
            min_samples=args.min_samples,
            seed=args.seed,
        )
        print(f"wrote {out}")
        return 0
    if args.action == "mini":
        from fcit_hpc.benchmark.mini import write_raw

        print(write_raw(args.out, args.train, args.test, args.seed))
        return 0
    if args.action == "embedded":
        return cmd_embedded(args)
    return cmd_identity(args)


def cmd_identity(args) -> int:
    """Identity separation figures of fcit-mini with an identity encoder."""
    import tempfile

    from fcit_hpc.benchmark.llava_json import load_conversations
    from fcit_hpc.benchmark.mini import GENERATORS, write_raw
    from fcit_hpc.config import load_config
    from fcit_hpc.eval.identity_report import separation
    from fcit_hpc.model.identity import make_encoder

    cfg = load_config(None, [f"method.identity_encoder={args.encoder}"])
    with tempfile.TemporaryDirectory() as tmp:
        raw = write_raw(Path(tmp), 80, 0, args.seed)
        ins = {
            n: [s.instruction for s in load_conversations(raw / n / "train.json", t, raw)]
            for t, n in enumerate(GENERATORS)
        }
    rep = separation(make_encoder(cfg.method), ins)
    print(
        f"fcit-mini identity separation, encoder {args.encoder} (4 clients x 20 samples per "
        f"task, cosine of identity tokens)"
    )
    for n, v in rep["within"].items():
        print(f"  within {n:<12} {v:.3f}")
    # descriptive: ">= 0.95" / "<= 0.85" (around DKO's τ = 0.9) say how unambiguous matching is,
    # they are not requirements (the single-template fcit-mini of recipe 1 gave 0.996 / 0.728)
    print(
        f"within-task: mean {rep['within_mean']:.3f}, min {rep['within_min']:.3f} "
        f"{rep['loosest_task']}  (>= 0.95: unambiguous at tau 0.9; descriptive)"
    )
    print(
        f"across-task: mean {rep['across_mean']:.3f}, max {rep['across_max']:.3f} "
        f"{rep['closest_pair']}  (<= 0.85: unambiguous at tau 0.9; descriptive)"
    )
    return 0


def cmd_embedded(args) -> int:
    """Build the embedded model of RECIPE (``--out``), or rebuild it in a temporary folder and
    check it against the shipped one (``--check``)."""
    import shutil
    import tempfile

    import torch

    from fcit_hpc.model.embedded import (
        RECIPE,
        WEIGHTS,
        build_embedded,
        heldout_loss,
        shipped_model,
    )

    log = lambda m: print(m, flush=True)  # noqa: E731
    if not args.check:
        out = Path(args.out)
        new = out.with_name(out.name + ".new")
        shutil.rmtree(new, ignore_errors=True)
        build_embedded(RECIPE, new, log)
        if out.exists():  # swap in the new build only once it is complete
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            new.rename(out)
            shutil.rmtree(old)
        else:
            new.rename(out)
        print(f"{out}: held-out loss {heldout_loss(out):.4f}")
        print((out / "recipe.json").read_text())
        return 0
    from safetensors.torch import load_file

    shipped = shipped_model()
    with tempfile.TemporaryDirectory() as tmp:
        built = build_embedded(RECIPE, Path(tmp) / "model", log)
        a, b = load_file(shipped / WEIGHTS), load_file(built / WEIGHTS)
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        diff = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else None
        ls, lb = heldout_loss(shipped), heldout_loss(built)
    # 1,500 steps amplify a CPU's own float rounding (another vector unit, another reduction
    # order) into other weights; what must agree is what they learnt. Near a held-out loss of
    # 0.001 (an untrained model: ~5.5) a relative bound alone is noise, hence the absolute one.
    bound = max(args.tolerance * ls, args.abs_tolerance)
    ok = same or (diff is not None and abs(lb - ls) <= bound)
    print(
        f"rebuilt embedded model: {'bitwise identical to' if same else 'differs from'} the "
        f"shipped one (max |weight difference| {diff}); held-out loss shipped {ls:.4f}, "
        f"rebuilt {lb:.4f} ({'within' if ok else 'OUTSIDE'} max({args.tolerance:.0%}, "
        f"{args.abs_tolerance} nats))"
    )
    return 0 if ok else 1


def cmd_report(args) -> int:
    from fcit_hpc.eval.report import comparison_table, write_report

    for d in args.run_dirs:
        write_report(d)
    table = comparison_table(args.run_dirs)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


def cmd_bench(args, comm) -> int:
    if args.what == "train":
        from fcit_hpc.bench_train import bench_train

        return bench_train(args)
    if args.items:
        raise ConfigError(f"fcit bench {args.what}: takes no CONFIG or overrides (--config)")
    if args.what == "rounds":
        from fcit_hpc.bench import bench_rounds

        return bench_rounds(args)
    if args.what == "scale":
        from fcit_hpc.bench_scale import bench_scale

        return bench_scale(args)
    from fcit_kernels.bench import main as bench_kernels

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
    r.add_argument(
        "--continue",
        dest="cont",
        action="store_true",
        help="continue the run in the config's run directory when it holds one of the same "
        "config (what a requeued SLURM job runs); else start it",
    )
    r.add_argument(
        "--accept-config",
        action="store_true",
        help="with --resume: continue with RUN_DIR/config.yaml's settings where they differ "
        "from the config stored in state.h5",
    )
    b = sub.add_parser(
        "bench",
        help="benchmarks: round wall time at 1 vs 2 ranks; 50 to 10,000 clients; kernels; one "
        "client's training",
    )
    b.add_argument("what", choices=["rounds", "scale", "kernels", "train"])
    b.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG [key.sub=value ...]",
        help="`bench train`: YAML config, then dotted overrides",
    )
    b.add_argument("--quick", action="store_true")
    b.add_argument("--json", help="write results as JSON to this file")
    b.add_argument("--config", default=None, help="config for `bench rounds` / `bench scale`")
    b.add_argument(
        "--skip-e2e", action="store_true", help="`bench kernels` on CUDA: no 7B decode latency"
    )
    b.add_argument(
        "--skip-compile", action="store_true", help="`bench kernels` on CUDA: no torch.compile"
    )
    b.add_argument(
        "--tune",
        action="store_true",
        help="`bench kernels` on CUDA: tune the kernel configs of the benchmarked shapes (and the "
        "7B model's FFN) missing from the table into the $FCIT_CACHE cache first",
    )
    b.add_argument(
        "--write-table",
        metavar="FILE",
        help="`bench kernels --tune`: write this GPU's config table (for "
        "kernels/fcit_kernels/configs/<device>.json)",
    )
    b.add_argument(
        "--points",
        choices=["issue"],
        help="`bench kernels` on CUDA: only issue 25's table (bf16 4096², S 8 r 8, M 1 … 4096; "
        "S·r 1024)",
    )
    b.add_argument("--steps", type=int, default=10, help="`bench train`: timed steps per side")
    b.add_argument("--warmup", type=int, default=2, help="`bench train`: untimed first steps")
    b.add_argument(
        "--client-steps",
        type=int,
        default=None,
        help="`bench train`: local steps of one client, for the set-up share",
    )
    b.add_argument(
        "--lengths",
        default="fixed",
        help="`bench train`: text tokens per sample: fixed (model.max_seq_len), uniform:LO:HI, "
        "or file:PATH (one integer per line)",
    )
    b.add_argument(
        "--variants",
        default="plain,fcit,liger,packing,liger+packing",
        help="`bench train`: rows to run beside plain and fcit: liger, packing, liger+packing",
    )
    pl = sub.add_parser(
        "plan", help="predicted wall time, memory per rank and bytes on the wire of a config"
    )
    pl.add_argument("items", nargs="+", help="YAML config, then dotted overrides")
    pl.add_argument("--gpus", type=int, default=None, help="ranks (one GPU each); default 1")
    pl.add_argument(
        "--figures",
        action="append",
        default=[],
        help="measured figures: a run directory (its phase timers), `fcit bench train --json` or "
        "`fcit bench kernels --json` output; repeatable, later ones win",
    )
    pl.add_argument("--json", default=None, help="also write the prediction as JSON")
    rp = sub.add_parser("report", help="write report.md + plots; print a table over runs")
    rp.add_argument("run_dirs", nargs="+")
    rp.add_argument("--out", help="also write the table (markdown) to this file")
    d = sub.add_parser("data", help="benchmark data: prepare the release tree, fcit-mini")
    dsub = d.add_subparsers(dest="action", required=True)
    dp = dsub.add_parser("prepare", help="partition raw per-dataset files into the release tree")
    dp.add_argument(
        "--raw", required=True, help="RAW/<Dataset>/{train,test}.json, images under RAW"
    )
    dp.add_argument("--out", required=True, help="the tree's root (FCIT_data)")
    dp.add_argument(
        "--setting",
        choices=["task", "capability", "joint", "joint-capability"],
        default="task",
        help="task: Task-related/seq, capability: Capability-related/cap, joint(-capability): "
        "their multask (Hom and Het read the same files)",
    )
    dp.add_argument("--order", choices=["paper", "eval_scripts"], default="paper")
    dp.add_argument("--beta", type=float, default=1.0)
    dp.add_argument("--num-clients", type=int, default=50)
    dp.add_argument("--min-samples", type=int, default=2)
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--datasets", help="comma-separated subset of the stage datasets")
    dm = dsub.add_parser("mini", help="write fcit-mini as raw per-dataset files")
    dm.add_argument("--out", required=True)
    dm.add_argument("--train", type=int, default=200)
    dm.add_argument("--test", type=int, default=20)
    dm.add_argument("--seed", type=int, default=0)
    di = dsub.add_parser("identity", help="identity-token separation of fcit-mini")
    di.add_argument("--encoder", default="minilm", choices=["minilm", "hashing"])
    di.add_argument("--seed", type=int, default=0)
    de = dsub.add_parser("embedded", help="build the embedded model, or check the shipped one")
    g = de.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="build the model of RECIPE into this folder")
    g.add_argument("--check", action="store_true", help="rebuild and compare with the shipped")
    de.add_argument(
        "--tolerance", type=float, default=0.05, help="relative held-out loss difference allowed"
    )
    de.add_argument(
        "--abs-tolerance",
        type=float,
        default=0.01,
        help="absolute held-out loss difference allowed (nats per token; the larger bound holds)",
    )
    dr = sub.add_parser(
        "doctor", help="what this environment holds for fcit_hpc, what is missing, and the fix"
    )
    dr.add_argument("--lock", help="requirements.lock to compare with (default: found)")
    dr.add_argument("--mpi-init", action="store_true", help="also MPI_Init (world size)")
    e = sub.add_parser("export", help="export a run's subspaces as PEFT LoRA adapters")
    e.add_argument("run_dir")
    e.add_argument("--out", help="directory (default RUN_DIR/adapters)")
    e.add_argument("--alpha", help="comma-separated SSA weights: also write the merged adapter")
    return p


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    args, extra = build_parser().parse_known_args(argv)
    if args.cmd in ("run", "bench", "plan"):  # overrides may follow options
        items = list(args.items) + extra
        unknown = [x for x in items if x.startswith("-")]
        if unknown:
            build_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
        args.items = items
    if args.cmd == "run":
        args.config = items[0] if items and "=" not in items[0] else None
        args.overrides = items[1:] if args.config else items
    elif extra and args.cmd not in ("bench", "plan"):
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    from fcit_hpc.fed.comm import make_comm

    comm = make_comm() if args.cmd == "run" else None
    level = logging.INFO if comm is None or comm.is_root else logging.WARNING
    rank = comm.rank if comm is not None else 0
    logging.basicConfig(level=level, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    try:
        if args.cmd == "run":
            from fcit_hpc.fed.preempt import stop_signals

            with stop_signals(announce=comm.is_root):
                code = cmd_run(args, comm)
        elif args.cmd == "export":
            code = cmd_export(args)
        elif args.cmd == "report":
            code = cmd_report(args)
        elif args.cmd == "data":
            code = cmd_data(args)
        elif args.cmd == "doctor":
            from fcit_hpc.doctor import main as doctor_main

            code = doctor_main(
                [
                    *(["--lock", args.lock] if args.lock else []),
                    *(["--mpi-init"] if args.mpi_init else []),
                ]
            )
        elif args.cmd == "plan":
            from fcit_hpc.plan import cmd_plan

            code = cmd_plan(args)
        else:
            code = cmd_bench(args, comm)
    except Preempted as e:
        if not e.collective:  # this rank stopped at once (set-up, evaluation, a second signal)
            from fcit_hpc.fed.preempt import tell

            if comm is None or comm.is_root:
                tell(f"fcit: {e}")
            else:
                print(f"fcit: rank {comm.rank}: {e}", file=sys.stderr, flush=True)
            _finish(comm, e.exit_code, abort=True)
            return e.exit_code
        # every rank agreed to stop here: all end normally (MPI finalized at exit, so that srun
        # and mpirun see clean exits) with 75, which the SLURM script reads as "requeue me"
        if comm is None or comm.is_root:
            print(f"fcit: {e}", file=sys.stderr)
        return e.exit_code
    except FcitError as e:
        if comm is None or comm.is_root or comm.size == 1 or e.rank_local:
            print(f"fcit: error: {e}", file=sys.stderr)
        _finish(comm, e.exit_code, abort=e.rank_local)
        return e.exit_code
    except BaseException as e:
        from fcit_hpc.crash import classify

        code, message = classify(e, args)
        print(f"fcit: {message}", file=sys.stderr, flush=True)
        _finish(comm, code, abort=True)
        return code
    if args.cmd == "run" and code == 0 and (comm is None or comm.is_root):
        _mark_end()
    return code


def _mark_end() -> None:
    """Tell slurm/fcit.sbatch that fcit itself got to its end: srun (SLURM 22.05) exits 0 when a
    step's tasks fail to launch, so the launcher's exit code alone cannot tell a finished run."""
    path = os.environ.get("FCIT_END_FILE")
    if path:
        with open(path, "w") as f:
            f.write("0\n")


def _finish(comm, code: int, abort: bool = False) -> None:
    """A failing rank in a multi-rank job takes the whole job down instead of leaving it hanging
    (``abort``: the others may be waiting in a collective for this rank)."""
    if comm is not None and comm.size > 1:
        if abort:
            comm.abort(code)
        # an input error is raised on every rank alike: exit without a collective; rank 0 has
        # printed the message, the others give it time to reach the terminal first
        sys.stderr.flush()
        if not comm.is_root:
            import time

            time.sleep(2.0)
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
