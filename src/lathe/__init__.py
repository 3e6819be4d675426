"""lathe: a self-hosted LoRA fine-tuning service that speaks the Tinker API."""

__version__ = "0.1.0"
