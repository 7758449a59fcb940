"""Names vulture (dead-code finder, run by .ci/run) reports as unused but that are part of
an interface the engine must accept: megatron-core passes these keyword arguments to every
core-attention module (``DotProductAttention``'s constructor contract), and Python passes
the current frame to every signal handler."""

attention_type  # models/attention.py SDPAAttention.__init__: megatron-core's contract
cp_comm_type  # idem (context parallelism is refused, not ignored)
pg_collection  # idem
frame  # engine/preemption.py PreemptionHandler._handle: signal handler signature
pre_optim_step  # engine/callbacks/base.py: a hook, called by the trainer on every callback
BAD_REASONS  # engine/data/readers.py: the documented set of skip reasons (BadRecord.reason)
UNKNOWN, CONTROL, UNUSED, BYTE  # engine/data/tokenizer_hf.py: SentencePiece's piece-type enum, listed whole
consumed_valid_samples  # engine/checkpoint.py TrainState: saved with every checkpoint (asdict)
lineage  # idem
pair_index  # engine/data/preference_data.py PreferenceSample: a TypedDict key the objective reads
sentences  # engine/data/tokenizer_train.py TrainStats: a TypedDict key, reported
activations  # parallel/plan.py: a plan field, printed and written with --json
