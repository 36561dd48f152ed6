"""HuggingFace model families; importing a module registers its family."""

from realhf.api.from_hf import gemma, gpt2, llama, mistral, mixtral, qwen2, qwen3  # noqa: F401
