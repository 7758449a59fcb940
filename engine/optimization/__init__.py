"""Model optimization through nvidia-modelopt: quantization (PTQ and QAT) and LoRA, one module each."""
