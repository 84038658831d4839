"""Auto-tuning: search the parameters of our schedule templates and of the generic ops, keep the best as
records under `tuning_logs/<arch>/`, and apply them at compile.

measure.py               BuiltCandidate (one compiled kernel to time), the Measurer protocol; LocalMeasurer
rpc_measure.py           RpcMeasurer: the same protocol on every server a TVM RPC tracker has under a key
loopback_rpc.py          LoopbackRpcCluster: a tracker and N servers on this machine (tests, benchmarks)
records.py               the template log: a JSON line per trial and per finished kernel; RecordLookup
template_search.py       one template kernel's search: default first, random start, XGBoost-ranked batches
extract_kernels.py       the distinct template kernels of a model, as compile would build them
generic_ops.py           the generic ops (lowered functions no template owns), tuned by meta_schedule
meta_schedule_search.py  how one generic op is searched (TVM's builder, runners, cost model), cleaned up after
generic_records.py       their JSON database under <log>/meta_schedule/; apply_generic_records for the build
tune_model.py            `tensorpress.tune` / `tensorpress tune`: extract, search each kernel, summarise
tensorcore_candidates.py the tile configs a CUDA kernel's candidates are drawn from (valid for the arch, ranked)
tuning_kit.py            CUDA: the candidates built here into a tuning kit that the GPU kit times on a GPU
kit_import.py            `tensorpress tune --import-kit`: the GPU's timings appended to a log as records
tuning_report.py         the summary table and the best-so-far plot

At compile, `RecordLookup` is the `ConfigLookup` (schedules/template_config.py) the template rules ask
before their defaults, and the build applies the generic ops' records before the rules run; the
manifest's kernel_configs and tuned_kernels say per kernel what was used and from where.
"""
