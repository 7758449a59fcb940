"""Text generation from engine checkpoints: megatron-core's KV cache and inference wrapper,
transformers' sampling definitions, the run's chat template and stop tokens.

Public API: ``generate(model_chunks, tokenizer, prompts, options, stream=None)`` on token ids,
``GenerationOptions``, ``GenerationResult``, and ``load_generator(path)`` which loads a
checkpoint with its tokenizer and chat template for text prompts.
"""

from engine.inference.decode import GenerationResult, StopTokens, generate
from engine.inference.loading import Generator, load_generator
from engine.inference.sampling import GenerationOptions

__all__ = ["GenerationOptions", "GenerationResult", "Generator", "StopTokens", "generate", "load_generator"]
