"""InfoTok fine-tuning pipeline for shared-token unified multimodal LLMs."""

__version__ = "0.1.0"
