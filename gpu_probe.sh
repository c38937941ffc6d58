nvidia-smi -L; python3 -V
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'tf', transformers.__version__, 'triton', triton.__version__, torch.cuda.is_available())"
python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|triton|pytest|pytest-xdist|pytest-timeout|peft|numpy|h5py|mpi4py|deepspeed|safetensors|pillow|pyyaml|hypothesis) " 
export PYTHONPATH=$PWD:$PWD/kernels TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 FCIT_SHOW_FAILURES=1 FCIT_CACHE=/tmp/fcit-cache
timeout 200 python3 -m pytest -m gpu -v -rfE --tb=short -p no:cacheprovider tests/test_decode_gpu.py --durations=5 2>&1 | tail -40
timeout 150 python3 gpu_probe.py 2>&1 | grep -v Loading | tail -20
