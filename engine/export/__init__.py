"""Getting a trained model out of the engine: Hugging Face (``hf``) and GGUF (``gguf``) files."""
