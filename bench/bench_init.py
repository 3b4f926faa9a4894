"""PEFT's preprocess_corda vs ours, end to end on the embedded model (see corda_kernels.cli.bench)."""

from corda_kernels.cli.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
