"""Speed benchmarks, run from the repo root as modules: python -m bench.bench_sample (bench_feedback, bench_train,
bench_baselines)."""
