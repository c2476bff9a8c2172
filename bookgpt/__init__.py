"""bookgpt's library: what the scripts at the top of the repository share.

config (typed keys, parsing, atomic files), common (device, dtype, autocast), tokenizer, batches,
checkpoint, distributed, optim (Muon, AdamW, schedules), distill, kernels (measured CPU kernels),
training (the run's config and one step), sampling, sweeps, and eval/ (baselines, textstats,
mixture, report). Nothing here imports a script.
"""
