"""swft-lite: LoRA fine-tuning of gpt-oss-20b on your own GPU, with verified merged and GGUF exports."""

__version__ = "0.1.0"
