from pathlib import Path

import pytest
import yaml

from fcit_hpc.config import Config, load_config, to_yaml
from fcit_hpc.errors import ConfigError

from .conftest import ROOT, fcit

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
LOCAL_PATHS = {"llava15_7b_task.yaml", "llava15_7b_capability.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    # parses and validates every field (paths are not required to exist); the configs of the real
    # model and data leave their local paths to the user
    fill = ["benchmark.data_root=/d", "model.path=/m", "method.encoder_path=/c"]
    cfg = load_config(path, fill if path.name in LOCAL_PATHS else [])
    assert isinstance(cfg, Config)
    # the resolved YAML loads back to the same config
    again = load_config(
        None,
        [
            f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
            for k, v in _flatten(yaml.safe_load(to_yaml(cfg)))
        ],
    )
    assert to_yaml(again) == to_yaml(cfg)


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_overrides_apply_with_types():
    cfg = load_config(
        None,
        [
            "federation.num_clients=7",
            "train.lr=1e-3",
            "method.name=finetune",
            "lora.target_modules=[up_proj]",
        ],
    )
    assert cfg.federation.num_clients == 7
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.method.name == "finetune"
    assert cfg.lora.target_modules == ["up_proj"]
    assert cfg.clients_per_round == 1


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["federation.foo=1"], "federation.foo: unknown key"),
        (["nope=1"], "nope: unknown key"),
        (["federation.num_clients=abc"], "federation.num_clients: expected an integer"),
        (["federation.num_clients=1.5"], "federation.num_clients: expected an integer"),
        (["federation.server_hosts_clients=1"], "federation.server_hosts_clients: expected true"),
        (["federation.client_selection_frac=0"], "federation.client_selection_frac: 0.0 is out"),
        (["federation.fed_alg=fedsgd"], "federation.fed_alg: 'fedsgd' is out of range"),
        (["method.tau=0"], "method.tau: 0.0 is out of range"),
        (["method.tau=1.01"], "method.tau: 1.01 is out of range"),
        (["method.epsilon=0"], "method.epsilon: 0.0 is out of range"),
        (["benchmark.dirichlet_beta=-1"], "benchmark.dirichlet_beta: -1.0 is out of range"),
        (["lora.target_modules=up_proj"], "lora.target_modules: expected a list"),
        (["train=3"], "train: expected a mapping"),
        (["model.num_heads=3"], "model.num_heads: 3 does not divide"),
        (["debug.nan_clients=[99]"], "debug.nan_clients: client id 99"),
        (["compare=[disco,fedsgd]"], "compare: unknown entry 'fedsgd'"),
        (["method.name=ewc", "method.ewc_lambda=-1"], "method.ewc_lambda: -1.0 is out of range"),
        (["method.olora_lambda=-0.5"], "method.olora_lambda: -0.5 is out of range"),
        (["eval.batch_size=0"], "eval.batch_size: 0 is out of range"),
    ],
)
def test_bad_values_name_the_field(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert fragment in str(e.value)


def test_tau_one_is_allowed():
    assert load_config(None, ["method.tau=1"]).method.tau == 1.0


def test_malformed_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: malformed YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["federation.client_selection_frac=0"], "federation.client_selection_frac"),
        (["federation.bogus=1"], "federation.bogus: unknown key"),
        (["train.batch_size=x"], "train.batch_size: expected an integer"),
    ],
)
def test_cli_bad_input_exit_2_and_leaves_the_run_alone(tmp_path, smoke_config, args, fragment):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("precious\n")
    p = fcit("run", str(smoke_config), "--out", str(run), *args)
    assert p.returncode == 2
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and fragment in lines[0]
    assert (run / "config.yaml").read_text() == "precious\n"
    assert sorted(x.name for x in run.iterdir()) == ["config.yaml"]


def test_cli_malformed_yaml_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: {num_clients: 3\n")
    p = fcit("run", str(bad))
    assert p.returncode == 2
    assert "bad.yaml: malformed YAML" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_resolved_config_is_written(tmp_path, smoke_config):
    out = tmp_path / "r"
    p = fcit(
        "run",
        str(smoke_config),
        "--out",
        str(out),
        "federation.num_rounds=1",
        "benchmark.num_tasks=1",
        "eval.enabled=false",
    )
    assert p.returncode == 0, p.stderr
    cfg = load_config(out / "config.yaml")
    assert cfg.federation.num_rounds == 1 and cfg.out_dir == str(out)
    assert Path(out / "state.h5").is_file()


@pytest.mark.parametrize("name,rank", [("llava15_7b_task", 64), ("llava15_7b_capability", 32)])
def test_llava_protocol_configs_ask_for_their_paths(name, rank):
    """The paper-protocol configs load once the three local paths are given, and say which is
    missing otherwise; LoRA budget and scaling as published (rank 64 / 32, alpha/r = 2)."""
    path = ROOT / "configs" / f"{name}.yaml"
    for given, missing in [
        ([], "method.encoder_path: required"),
        (["method.encoder_path=/c"], "benchmark.data_root: required"),
        (["method.encoder_path=/c", "benchmark.data_root=/d"], "model.path: required"),
    ]:
        with pytest.raises(ConfigError, match=missing):
            load_config(path, given)
    paths = ["benchmark.data_root=/d", "model.path=/m", "method.encoder_path=/c"]
    cfg = load_config(path, paths)
    assert cfg.lora.lora_r * cfg.lora.max_subspaces == rank
    assert cfg.lora.lora_alpha / cfg.lora.lora_r == 2
    t = cfg.train
    assert (t.precision, t.backend, t.zero_stage, t.gpus_per_client) == ("bf16", "deepspeed", 2, 4)
    assert cfg.train.projector_lr == 2e-5 and cfg.eval.max_new_tokens == 128


def test_the_config_reference_is_generated_from_the_dataclasses():
    """docs/config.md is `python -m fcit_hpc.config_reference --write`'s output: every field of the
    config dataclasses has a line there with its type and current default, and no line names a
    field that does not exist."""
    import dataclasses

    from fcit_hpc.config import Config
    from fcit_hpc.config_reference import DOC_PATH, FIELD_DOCS, render

    text = render()
    assert DOC_PATH.read_text(encoding="utf-8") == text, (
        "python -m fcit_hpc.config_reference --write"
    )
    cfg = Config()
    n = 0
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        for g in dataclasses.fields(sub) if dataclasses.is_dataclass(sub) else [None]:
            name = f.name if g is None else f"{f.name}.{g.name}"
            assert f"| `{name}` |" in text
            n += 1
    assert n == len(FIELD_DOCS) > 60


def test_the_config_reference_names_a_field_without_a_line(monkeypatch):
    from fcit_hpc import config_reference

    docs = dict(config_reference.FIELD_DOCS)
    del docs["train.lr"]
    monkeypatch.setattr(config_reference, "FIELD_DOCS", docs)
    with pytest.raises(KeyError, match="train.lr"):
        config_reference.render()


def test_each_method_reads_its_own_settings_and_every_method_field_is_read():
    """A method's settings dataclass names fields of the ``method`` section (docs/architecture.md,
    "Configuration"); every field of the section but ``name`` is read by some method; the values
    are the section's (overrides included)."""
    import dataclasses

    from fcit_hpc.config import MethodConfig
    from fcit_hpc.methods import make_method, method_class
    from fcit_hpc.registry import METHODS

    section = {f.name for f in dataclasses.fields(MethodConfig)}
    read = set()
    for name in METHODS:
        fields = {f.name for f in dataclasses.fields(method_class(name).settings_class)}
        assert fields <= section, (name, fields - section)
        read |= fields
    assert section - read == {"name"}
    cfg = load_config(None, ["method.tau=0.75", "method.epsilon=0.2", "lora.max_subspaces=3"])
    disco = make_method(cfg.method, cfg.lora)
    assert (disco.settings.tau, disco.settings.epsilon, disco.num_slots()) == (0.75, 0.2, 3)
    ewc_cfg = load_config(None, ["method.name=ewc"])
    ewc = make_method(ewc_cfg.method, ewc_cfg.lora)
    assert dataclasses.asdict(ewc.settings) == {"ewc_lambda": MethodConfig().ewc_lambda}
