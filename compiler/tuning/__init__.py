"""Auto-tuning: search the parameters of our schedule templates and of the generic ops, keep the best as
records under `tuning_logs/<arch>/`, and apply them at compile.

measure.py       BuiltCandidate (one compiled kernel to time) and the Measurer protocol; LocalMeasurer
rpc_measure.py   RpcMeasurer: the same protocol on every server a TVM RPC tracker has under a key
loopback_rpc.py  LoopbackRpcCluster: a tracker and N servers on this machine (tests, benchmarks, local runs)
generic_ops.py   the generic ops (lowered functions no template owns), tuned by meta_schedule: tune_generic_ops
meta_schedule_search.py  how one op is searched (TVM's builder, runners, cost model) and cleaned up after
generic_records.py  their JSON database under <log>/meta_schedule/ and apply_generic_records for the build
"""
