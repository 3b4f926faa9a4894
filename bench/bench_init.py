"""PEFT's preprocess_corda vs ours, end to end on the embedded model (see corda_kernels.bench_init)."""

from corda_kernels.bench_init import main

if __name__ == "__main__":
    raise SystemExit(main())
