"""Model optimization through nvidia-modelopt (the ``[opt]`` extra): each module composes one
of its techniques with the engine (LoRA in ``lora``, quantization in ``quantize``)."""
