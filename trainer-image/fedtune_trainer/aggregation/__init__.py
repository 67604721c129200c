"""The aggregator's steps, each in the module named for it; `fedtune_trainer.aggregate` runs them.

`intake` (fetch and verify one client's delta before anything is spent on it), `bounds` (the
checks and bounded influence: sample counts, the share cap, the outlier bound, finiteness),
`reducers` (the weighted mean, streamed) and `robust` (median, trimmed mean, Krum), `privacy`
(client-level DP: the noise, the accountant, adaptive clipping and their state) and `server` (the
server optimizers and their versioned state).
"""
