#!/usr/bin/env bash
# Can `srun --mpi=pmix` start ranks here? Slurm's mpi/pmix plugin dlopens the *unversioned*
# libpmix.so of the PMIx it was built against, in a directory compiled into the plugin. Debian's
# libpmix2 ships only libpmix.so.2; the unversioned link comes with libpmix-dev. (`srun --mpi=list`
# names pmix even when the library is missing, so it is not a sufficient check.)
set -euo pipefail
plugin=$(ls /usr/lib/*/slurm-wlm/mpi_pmix_v*.so /usr/lib*/slurm/mpi_pmix_v*.so 2>/dev/null | head -1 || true)
if [ -z "$plugin" ]; then
  echo "check_pmix: missing Slurm's mpi/pmix plugin (mpi_pmix_v*.so; Debian: slurm-wlm-basic-plugins)" >&2
  exit 1
fi
libdir=$(grep -aoE '/[[:alnum:]_./-]*pmix[[:alnum:]_./-]*/lib' "$plugin" | head -1 || true)
lib="${libdir:-/usr/lib}/libpmix.so"
if ! python3 -c 'import ctypes, sys; ctypes.CDLL(sys.argv[1])' "$lib" 2>/dev/null; then
  echo "check_pmix: $plugin needs $lib (the unversioned PMIx library), which cannot be loaded;" \
       "on Debian/Ubuntu: apt-get install libpmix-dev" >&2
  exit 1
fi
echo "check_pmix: $plugin loads $lib"
