"""BMI benchmarks: `make bench` (quick) or `BENCH_SCALE=full make bench`."""
