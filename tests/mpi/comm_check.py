"""Run under mpiexec -n P: every collective of MPIComm, checked against rank arithmetic."""

import numpy as np

from fcit_hpc.fed.comm import MPIComm

comm = MPIComm()
r, P = comm.rank, comm.size

# Bcast of any shape/dtype from root
for dt in (np.float32, np.float64, np.int64, np.uint8):
    src = np.arange(24, dtype=dt).reshape(2, 3, 4) * 3 if r == 0 else None
    got = comm.bcast_array(src)
    assert got.dtype == dt and got.shape == (2, 3, 4)
    assert np.array_equal(got, np.arange(24, dtype=dt).reshape(2, 3, 4) * 3)

# every rank counts the broadcast bytes alike: 4 arrays of 24 values, each after a 6 x int64 header
assert comm.bytes_broadcast == 4 * 6 * 8 + 24 * (4 + 8 + 8 + 1), comm.bytes_broadcast

# Gatherv of ragged parts: rank i sends i+1 values equal to 10*i + j
part = np.array([10 * r + j for j in range(r + 1)], dtype=np.float32)
parts = comm.gatherv(part)
if r == 0:
    assert len(parts) == P
    for i, p in enumerate(parts):
        assert np.array_equal(p, np.array([10 * i + j for j in range(i + 1)], np.float32))
else:
    assert parts is None

# Gatherv with an empty contribution on odd ranks
empty = np.zeros(0 if r % 2 else 2, np.int64) + r
parts = comm.gatherv(empty)
if r == 0:
    assert [p.size for p in parts] == [0 if i % 2 else 2 for i in range(P)]

# Scatterv: rank i receives 2*i values of value i
send = [np.full(2 * i, i, np.int64) for i in range(P)] if r == 0 else None
mine = comm.scatterv(send, np.int64)
assert mine.size == 2 * r and (mine == r).all()
# Allreduce max: a vote of all ranks, not counted as broadcast bytes
nbytes = comm.bytes_broadcast
assert comm.allreduce_max(3 * r) == 3 * (P - 1) and comm.allreduce_max(0) == 0
assert comm.bytes_broadcast == nbytes
comm.barrier()
print(f"rank {r}/{P} ok")
