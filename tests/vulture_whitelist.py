"""Names vulture (dead-code finder, run by .ci/run) reports as unused but that are part of
an interface the engine must accept: megatron-core passes these keyword arguments to every
core-attention module (``DotProductAttention``'s constructor contract), and Python passes
the current frame to every signal handler."""

attention_type  # models/attention.py SDPAAttention.__init__: megatron-core's contract
cp_comm_type  # idem (context parallelism is refused, not ignored)
pg_collection  # idem
frame  # engine/preemption.py PreemptionHandler._handle: signal handler signature
