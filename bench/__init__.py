"""fedtune's benchmarks: `make bench` (`python -m bench`) runs them, prints a markdown table for
each and writes `bench/results/<name>.json` (rows plus the machine they ran on).

Benchmarks, one module each:

- `communication`: bytes uploaded per client per round and final eval loss for full-model FedAvg
  and for GradualDiff deltas at several encodings (tiny model, trained for real), plus the bytes
  the same encodings give on 1B- and 7B-parameter Llama shapes (encoded for real, not trained);
- `parity`: federated (FedAvg, FedAdam) against centralized training, same total optimizer steps;
- `aggregation`: the streaming aggregator against a load-everything baseline, time and peak RSS;
- `operator`: orchestration latency between rounds and operator memory, on the devcluster.

Benchmarks are not tests: they run outside `make test`. `tests/bench/` runs each at tiny sizes.
docs/benchmarks.md explains the method and what the numbers mean when choosing settings.
"""
