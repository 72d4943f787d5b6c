"""The parts of bench/memory_grid.py, the GPU calibration grid for the memory estimate.

- points: what runs (grid points, the plan check, --tiny's shrinking) and the estimate of it;
- timing: the time prior that sizes a slice, and `--list`;
- slices: the deadline loop (pure: clock, runner and checkpoint builder are injected);
- records: the jsonl of finished points, each point's record, and re-estimating it;
- summary, report: the numbers from the records alone, and json/csv/md written from them;
- stack: what the parent knows of the machine (imports, NVML, versions);
- child, runner, session: one point in a child process, the parent watching it, and one slice.
"""
