"""Auto-tuning: search the parameters of our schedule templates and of the generic ops, keep the best as
records under `tuning_logs/<arch>/`, and apply them at compile.

measure.py           BuiltCandidate (one compiled kernel to time) and the Measurer protocol; LocalMeasurer
records.py           the log: a JSON line per trial and per finished kernel; reading it; RecordLookup
template_search.py   one template kernel's search: default first, random start, XGBoost-ranked batches
extract_kernels.py   the distinct template kernels of a model, as compile would build them
tune_model.py        `tensorpress.tune` / `tensorpress tune`: extract, search each kernel, summarise
tuning_report.py     the summary table and the best-so-far plot

At compile, `RecordLookup` is the `ConfigLookup` (schedules/template_config.py) the template rules ask
before their defaults; the manifest's kernel_configs says per kernel what was used and from where.
"""
