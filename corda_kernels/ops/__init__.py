"""The operations: one module per op, each a ``torch.library`` custom op with a schema, a fake
kernel and a pure-torch implementation (the CPU path and the tests' fast oracle); Triton
implementations in :mod:`corda_kernels.kernels` register into the same ops. ``cosvd/`` holds the
context-oriented SVD, exact and fast."""
