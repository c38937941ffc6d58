"""GPU paths, on a CUDA device: `make test-gpu` (pytest -m gpu). CPU CI deselects them (the
`gpu` marker is excluded in pytest.ini, and pytest reports them as deselected). On a machine
without CUDA, `make test-gpu` fails here rather than passing vacuously."""

import numpy as np
import pytest
import torch

from fcit_hpc.state.schema import read_state

from .conftest import BIN, ROOT, mpiexec

pytestmark = pytest.mark.gpu
FCIT = str(BIN / "fcit") if (BIN / "fcit").exists() else "fcit"  # beside the tests' python
SMOKE = str(ROOT / "configs/smoke.yaml")
# tests that compare trained adapters only skip the evaluation (generation is covered by
# test_smoke_on_the_gpu_matches_the_cpu and tests/test_decode_gpu.py): the suite fits its budget
NO_EVAL = "eval.enabled=false"


def _run_in_process(out, *overrides):
    from fcit_hpc import cli

    code = cli.main(["run", SMOKE, "--out", str(out), *overrides])
    assert code == 0
    return read_state(out)


def test_smoke_on_the_gpu_matches_the_cpu(tmp_path):
    """The same run on the GPU in float32 (TF32 off, torch's default for matmul) and on the CPU:
    the work is on the GPU, and the state agrees up to kernel summation order."""
    torch.cuda.reset_peak_memory_stats()
    gpu = _run_in_process(tmp_path / "gpu", "train.device=cuda", "train.deterministic=true")
    assert torch.cuda.max_memory_allocated() > 0
    cpu = _run_in_process(tmp_path / "cpu", "train.device=cpu")
    assert np.abs(cpu.adapter).max() > 1e-2
    np.testing.assert_allclose(gpu.adapter, cpu.adapter, atol=1e-4, rtol=0)
    np.testing.assert_allclose(gpu.accuracy, cpu.accuracy, atol=1e-9, equal_nan=True)


def test_gpu_world_size_invariance(tmp_path):
    """P = 1 and P = 2 ranks on the GPU (two ranks share one GPU: train.ranks_per_gpu=2)."""
    runs = []
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        p = mpiexec(
            n,
            FCIT,
            "run",
            SMOKE,
            "--out",
            str(out),
            "train.device=cuda",
            "train.ranks_per_gpu=2",
            NO_EVAL,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(read_state(out))
    np.testing.assert_allclose(runs[1].adapter, runs[0].adapter, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(runs[1].clients["client"], runs[0].clients["client"])


@pytest.mark.parametrize(
    "backend", [["train.backend=torch"], ["train.backend=deepspeed", "train.zero_stage=2"]]
)
def test_bf16_on_the_gpu(tmp_path, backend):
    """bf16 base weights on the GPU, float32 LoRA masters: the update agrees in direction with
    the float32 run."""
    ref = _run_in_process(
        tmp_path / "fp32", "train.device=cuda", "lora.lora_dropout=0", NO_EVAL, *backend
    )
    bf = _run_in_process(
        tmp_path / "bf16",
        "train.device=cuda",
        NO_EVAL,
        "train.precision=bf16",
        "lora.lora_dropout=0",
        *backend,
    )
    assert bf.adapter.dtype == np.float32
    a, b = ref.adapter.reshape(-1), bf.adapter.reshape(-1)
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    plain = _run_in_process(tmp_path / "a", "train.device=cuda", "lora.lora_dropout=0", NO_EVAL)
    ckpt = _run_in_process(
        tmp_path / "b",
        "train.device=cuda",
        NO_EVAL,
        "lora.lora_dropout=0",
        "train.gradient_checkpointing=true",
    )
    np.testing.assert_allclose(ckpt.adapter, plain.adapter, atol=1e-6, rtol=0)
