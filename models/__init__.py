"""Models: presets, layer specs, megatron-core GPTModel construction, Hugging Face weight mapping."""
